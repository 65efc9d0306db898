"""Which timm model families LoCo can train: the check behind ``benchmarks/coverage.py`` and the family tests.

For one model, :func:`check_model` runs the protocol of the "any timm backbone" promise:

* the default stages (:func:`loco_timm.split_stages`): how many, each feature's shape and layout;
* composition: the stages applied in order equal ``forward_features`` (eval mode; exact, or allclose);
* one LoCo step (train mode) gives a gradient to every parameter ``forward_features`` uses;
* ``step(units=[top unit])`` leaves the first stage's own parameters without gradient (a parameter a stage of the
  top unit reads too, such as a position bias shared by all blocks, may learn from it).

:func:`smallest_models` picks the smallest model (parameter count, built on the meta device) of every family
(timm module) of the installed timm.
"""
from __future__ import annotations

import time
import traceback
import warnings

import timm
import torch
from accelerate import init_empty_weights

from loco_timm.core.learner import LocalLearner

__all__ = ['smallest_models', 'largest_models', 'param_count', 'check_model', 'input_size_for']

SIDE = 128


def smallest_models(families: list[str] | None = None) -> dict[str, str | None]:
    """Family (timm module name) -> its model with the fewest parameters (None when no model of it builds)."""
    return {family: min(counts, key=counts.get) if counts else None
            for family, counts in _family_counts(families).items()}


def largest_models(families: list[str] | None = None, limit: float = 30e6) -> dict[str, str | None]:
    """Family -> its model with the most parameters under ``limit`` (None when none builds under it): a second
    sample of each family, beyond the smallest model the coverage report picks."""
    picks = {}
    for family, counts in _family_counts(families).items():
        under = {name: count for name, count in counts.items() if count < limit}
        picks[family] = max(under, key=under.get) if under else None
    return picks


def _family_counts(families: list[str] | None) -> dict[str, dict[str, int]]:
    """Family -> {model: parameter count} of every model of it that builds."""
    out = {}
    for family in families or timm.list_modules():
        counts = {}
        for name in timm.list_models(module=family):
            try:
                counts[name] = param_count(name)
            except Exception:  # noqa: BLE001 - a model that does not build is skipped
                continue
        out[family] = counts
    return out


def param_count(name: str) -> int:
    """Parameters of timm model ``name``, built on the meta device (nothing allocated or initialised), or where
    that fails (older timm reads drop-path rates with ``.item()``) with only its parameters on the meta device, or
    else on the CPU."""
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        try:
            with torch.device('meta'):
                return sum(p.numel() for p in timm.create_model(name).parameters())
        except Exception:  # noqa: BLE001 - try again with real tensors for everything but the parameters
            pass
        try:
            with init_empty_weights():
                return sum(p.numel() for p in timm.create_model(name).parameters())
        except Exception:  # noqa: BLE001 - some models compute with their parameters while they build
            return sum(p.numel() for p in timm.create_model(name).parameters())


def input_size_for(model: torch.nn.Module, side: int = SIDE) -> tuple[int, int, int]:
    """``side`` px; else twice or four times ``side`` where that is smaller than the model's own size, else the model's
    smallest input size (``min_input_size``), where ``side`` px does not run (a patch size that does not divide it, a
    map that valid convolutions shrink to nothing); else the model's own input size (also where it is fixed)."""
    cfg = model.pretrained_cfg
    default = tuple(cfg.get('input_size', (3, 224, 224)))
    if cfg.get('fixed_input_size', False):
        return default
    # side px, then twice and four times it below the model's own size (Inception's valid convolutions need about
    # 75 px), then its smallest size
    candidates = [(default[0], s, s) for s in (side, 2 * side, 4 * side) if s == side or s < default[1]]
    smallest = tuple(cfg.get('min_input_size') or ())
    if len(smallest) == 3 and smallest[1] * smallest[2] < default[1] * default[2]:
        candidates.append(smallest)
    was = model.training
    model.eval()
    try:
        for size in candidates:
            try:
                with torch.no_grad():
                    model.forward_features(torch.zeros(1, *size))
                return size
            except Exception:  # noqa: BLE001 - the model needs another size
                continue
    finally:
        model.train(was)
    return default


def _allclose(a, b) -> tuple[bool, float]:
    if isinstance(a, torch.Tensor):
        if a.shape != b.shape:
            return False, float('inf')
        diff = (a.float() - b.float()).abs().max().item() if a.numel() else 0.0
        return torch.allclose(a, b, rtol=1e-4, atol=1e-5), diff
    results = [_allclose(x, y) for x, y in zip(a, b)]
    return all(r[0] for r in results) and len(a) == len(b), max((r[1] for r in results), default=0.0)


def _describe(error: Exception) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else ''
    return f'{type(error).__name__}: {text}'[:300]


def check_model(name: str, side: int = SIDE, batch: int = 2, seed: int = 0, model_args: dict | None = None) -> dict:
    """Run the protocol on one timm model (untrained), built with ``model_args`` if given (an int ``img_size`` among
    them is the input size). Returns a dict with ``ok`` and the measurements, or the first failing check and its
    reason."""
    start = time.perf_counter()
    row: dict = dict(model=name, ok=False)
    try:
        torch.manual_seed(seed)
        model = timm.create_model(name, **(model_args or {}))
        img_size = (model_args or {}).get('img_size')  # a fixed-size model built for another size
        size = (3, img_size, img_size) if isinstance(img_size, int) else input_size_for(model, side)
        row['input_size'] = list(size)
        learner = LocalLearner(model, mode='loco', input_size=size)
        row.update(stages=len(learner.stages), shapes=[list(map(list, s)) if s and isinstance(s[0], tuple) else
                                                       list(s) for s in learner.stage_shapes],
                   layouts=[list(x) if isinstance(x, tuple) else x for x in learner.layouts],
                   units=[list(u) for u in learner.units])
        x = torch.randn(batch, *size)
        model.eval()
        with torch.no_grad():
            expected = model.forward_features(x)
            got = learner(x)[-1]
        close, diff = _allclose(got, expected)
        row.update(composition=close, max_abs_diff=diff)
        if not close:
            row['reason'] = f'stages differ from forward_features (max abs diff {diff:.3g})'
            return row
        model.train()
        learner.train()
        used = _used_parameters(model, x)
        view1, view2 = torch.randn(batch, *size), torch.randn(batch, *size)
        learner.zero_grad(set_to_none=True)
        losses = learner.step(view1, view2)
        row['losses'] = [round(float(v), 4) for v in losses.values()]
        names = {id(p): n for n, p in model.named_parameters()}
        missing = [names[id(p)] for p in used if p.grad is None or not torch.isfinite(p.grad).all()]
        row['params_used'] = len(used)
        if missing:
            row['reason'] = f'{len(missing)} parameter(s) forward_features uses got no finite gradient: {missing[:3]}'
            return row
        learner.zero_grad(set_to_none=True)
        learner.step(view1, view2, units=[len(learner.units) - 1])
        first, last = learner.units[-1]
        shared = {id(p) for k in range(first, last + 1) for p in learner.stages[k].parameters()}
        # the first stage's own parameters (one a later stage also reads, e.g. a shared position bias, may learn)
        leaked = [names.get(id(p), '?') for p in learner.stages[0].parameters()
                  if p.grad is not None and id(p) not in shared]
        if leaked and len(learner.units) > 1 and learner.units[-1][0] > 0:
            row['reason'] = f'the top unit gave the first stage gradient: {leaked[:3]}'
            return row
        row['ok'] = True
    except Exception as e:  # noqa: BLE001 - the report records why a family fails
        row['reason'] = _describe(e)
        row['where'] = traceback.extract_tb(e.__traceback__)[-1].name if e.__traceback__ else ''
    finally:
        row['seconds'] = round(time.perf_counter() - start, 2)
    return row


def _used_parameters(model: torch.nn.Module, x: torch.Tensor) -> list[torch.nn.Parameter]:
    """The parameters whose gradient ``forward_features`` reaches (train mode)."""
    model.zero_grad(set_to_none=True)
    out = model.forward_features(torch.cat([x, x]))
    tensors = [out] if isinstance(out, torch.Tensor) else [t for t in out if isinstance(t, torch.Tensor)]
    sum(t.float().sum() for t in tensors).backward()
    used = [p for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    return used
