"""split_stages: where a timm backbone is cut, for every family.

LoCo (Xiong, Ren & Urtasun, NeurIPS 2020, arXiv:2008.01342) and Greedy InfoMax train a network as a chain of
stages. :func:`split_stages` cuts a timm model into ``K`` modules whose composition is exactly
``model.forward_features(x)``:

* a family with a registered adapter (:mod:`loco_timm.core.stages.adapters`) is split into chains of its atoms;
* every other model is traced with torch.fx (:mod:`loco_timm.core.stages.graph`) and cut after timm's ``feature_info``
  modules. Levels at stride 2 or less are merged into the first stage while more than 4 levels remain (ResNet-50:
  stem+res2, res3, res4, res5; VGG: the two full-resolution levels join the first stage); the last level and
  everything after it (final norm) form the last stage. A model whose levels do not downsample (a ViT, whose
  levels are its blocks) has them grouped into 4 equal stages.
* ``num_stages`` below the default merges neighbouring stages into near-equal groups; above it, the stage with the
  most blocks (modules held in an ``nn.Sequential`` or ``nn.ModuleList`` inside a level) is split at its middle
  block until there are enough (the paper's "progressive" 6-stage ResNet-50).
"""
from __future__ import annotations

import torch
from timm.data import resolve_model_data_config
from torch import nn

from .adapters import check_num_stages, equal_groups, find_adapter, split_atoms
from .graph import GraphSplit, TracedFeatures, trace_features

__all__ = ['split_stages', 'default_levels']

MAX_DEFAULT_STAGES = 4


def _feature_info(model: nn.Module) -> list[dict]:
    info = getattr(model, 'feature_info', None) or []
    info = getattr(info, 'info', info)  # timm's FeatureInfo object on features_only models
    return [dict(f) for f in info if isinstance(f, dict) and f.get('module')]


def _first_tensor(value):
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        return next((v for v in value if isinstance(v, torch.Tensor)), None)
    return None


@torch.no_grad()
def _module_shapes(model: nn.Module) -> tuple[dict[str, tuple], tuple[int, int]]:
    """Output shape of every module's last call in ``forward_features`` (eval, the model's own input size)."""
    size = tuple(resolve_model_data_config(model)['input_size'])
    shapes, hooks = {}, []
    for name, module in model.named_modules():
        def record(_, __, out, name=name):
            t = _first_tensor(out)
            if t is not None:
                shapes[name] = tuple(t.shape[1:])
        hooks.append(module.register_forward_hook(record))
    flags = {m: m.training for m in model.modules()}
    model.eval()
    param = next(model.parameters(), None)
    try:
        model.forward_features(torch.zeros(1, *size, device=param.device if param is not None else 'cpu'))
    finally:
        for h in hooks:
            h.remove()
        for m, flag in flags.items():
            m.training = flag
    return shapes, size[1:]


def _matches(shape: tuple, channels: int, reduction: int, size: tuple) -> bool:
    """A module output is the level's feature map or token sequence (NCHW, NHWC or tokens, up to 8 prefix tokens)."""
    if not reduction or reduction < 1:  # e.g. a head level (reduction 0)
        return False
    h, w = size[0] // reduction, size[1] // reduction
    if len(shape) == 3:
        return shape == (channels, h, w) or shape == (h, w, channels)
    if len(shape) == 2:
        return shape[1] == channels and 0 <= shape[0] - h * w <= 8
    return False


def _nested_name(name: str, traced: TracedFeatures) -> str | None:
    """``name`` inside the one wrapped submodule that has it (Gemma 4's classifier names its encoder's levels
    ``blocks.0`` for ``encoder.blocks.0``), or None."""
    found = set()
    for m in traced.ends:
        dotted = f'.{m}.'
        at = dotted.find(f'.{name}.', 1)
        if at > 0:
            found.add(m[:at + len(name)])
    return found.pop() if len(found) == 1 else None


def _resolve_levels(model: nn.Module, traced: TracedFeatures) -> list[dict]:
    """``feature_info`` levels with a module ``forward_features`` calls. A container that is never called itself
    (an ``nn.ModuleList``) stands for its last called block. A name that is no module (Twins, MViT-v2: ``block.0``),
    or one named by several levels (CoaT's ``parallel_blocks``), is replaced by the last module whose output has
    the level's channels and resolution and that ends before the next level's first such module begins, when that
    finds more distinct levels than the names do."""
    info = _feature_info(model)
    names = [f['module'] for f in info]
    by_name, unresolved = [], []
    for i, f in enumerate(info):
        name = f['module']
        if name not in traced.ends and not any(m.startswith(name + '.') for m in traced.ends):
            name = _nested_name(name, traced) or name
        if name not in traced.ends:
            inside = [m for m in traced.ends if m.startswith(name + '.')]
            name = max(inside, key=lambda m: (traced.ends[m], -m.count('.'))) if inside else None
        if name is None or names.count(f['module']) > 1:
            unresolved.append(i)
        by_name.append(dict(f, module=name))
    by_name_ok = [f for f in by_name if f['module'] is not None]
    if not unresolved or not all('reduction' in f and 'num_chs' in f for f in info):
        return by_name_ok
    shapes, size = _module_shapes(model)
    called = [m for m in shapes if m in traced.ends]
    by_shape, previous = [dict(f) for f in by_name], -1
    for i, f in enumerate(by_shape):
        if i not in unresolved:
            previous = max(previous, traced.ends[f['module']])
            continue
        mine = [m for m in called if traced.ends[m] > previous and _matches(shapes[m], f['num_chs'], f['reduction'],
                                                                              size)]
        if i + 1 < len(by_shape):
            nxt = by_shape[i + 1]
            later = [traced.starts[m] for m in called if traced.ends[m] > previous and _matches(
                shapes[m], nxt['num_chs'], nxt['reduction'], size)]
            if later:
                mine = [m for m in mine if traced.ends[m] <= min(later)]
        f['module'] = max(mine, key=lambda m: (traced.ends[m], -m.count('.'))) if mine else None
        previous = traced.ends[f['module']] if mine else previous
    by_shape = [f for f in by_shape if f['module'] is not None]
    # keep whichever finds more distinct levels (CrossViT names each block once per branch: by name)
    distinct = [len({traced.ends[f['module']] for f in found}) for found in (by_name_ok, by_shape)]
    return by_shape if distinct[1] > distinct[0] else by_name_ok


def default_levels(model: nn.Module, traced: TracedFeatures) -> tuple[list[dict], list[dict]]:
    """The ``feature_info`` levels that end the default stages (the last one ends the last stage), in call order,
    and every level ``forward_features`` calls.

    Raises:
        ValueError: If ``feature_info`` names no module that ``forward_features`` calls.
    """
    levels, seen = [], set()
    for f in sorted(_resolve_levels(model, traced), key=lambda f: traced.ends[f['module']]):
        if traced.ends[f['module']] not in seen:
            seen.add(traced.ends[f['module']])
            levels.append(f)
    if not levels and not _feature_info(model):
        raise ValueError(f'cannot split {type(model).__name__}: it has no feature_info (newer timm versions add it '
                         f'to more models: upgrade timm, or register a stage adapter for it)')
    if not levels:
        raise ValueError(f'cannot split {type(model).__name__}: its feature_info names no module that '
                         f'forward_features calls')
    if len({f.get('reduction') for f in levels}) < 2:  # no downsampling hierarchy: equal groups of levels
        sizes = equal_groups(len(levels), min(MAX_DEFAULT_STAGES, len(levels)))
        return [levels[sum(sizes[:i + 1]) - 1] for i in range(len(sizes))], levels
    default = list(levels)
    while len(default) > MAX_DEFAULT_STAGES and (default[0].get('reduction') or 0) <= 2:
        default.pop(0)  # stem levels join the first stage
    return default, levels


def _block_ends(model: nn.Module, traced: TracedFeatures, levels: list[dict]) -> list[int]:
    """Graph positions after which a block inside a level ends: the finest legal cuts besides the levels. Within
    each level only its shallowest blocks count (ResNet: ``layer3.2``, not a block's inner ``nn.Sequential``)."""
    in_container = set()
    for name, module in model.named_modules():
        if isinstance(module, (nn.Sequential, nn.ModuleList)):
            in_container |= {f'{name}.{child}' if name else child for child in module._modules}
    found = set()
    for level in levels:
        name = level['module']
        lo, hi = traced.starts[name], traced.ends[name]
        blocks = [m for m in in_container if m.startswith(name + '.') and m in traced.ends
                  and lo < traced.ends[m] <= hi]
        if blocks:
            depth = min(m.count('.') for m in blocks)
            found |= {traced.ends[m] for m in blocks if m.count('.') == depth and traced.ends[m] < hi}
    return sorted(found)


def _module_at(traced: TracedFeatures, end: int, candidates: list[str]) -> str:
    return min((m for m in candidates if traced.ends[m] == end), key=lambda m: m.count('.'))


def _cut_first_blocks(model: nn.Module, traced: TracedFeatures, cuts: list[int], blocks: list[int],
                      count: int) -> list[int]:
    """``cuts`` plus a cut after the first ``count`` blocks of every stage but the first."""
    bounds = [-1] + cuts + [len(traced.graph.nodes)]
    extra = []
    for i in range(1, len(bounds) - 1):
        inside = [c for c in blocks if bounds[i] < c < bounds[i + 1]]
        if len(inside) < count:
            raise ValueError(f'cannot cut stage {i} of {type(model).__name__} after its first {count} block(s): it has '
                             f'{len(inside) + 1}; use fewer blocks')
        extra.append(inside[count - 1])
    return sorted(cuts + extra)


def split_stages(model: nn.Module, num_stages: int | None = None, *, first_blocks: int = 0,
                 input_size: tuple[int, ...] | None = None) -> nn.ModuleList:
    """Split a timm model's ``forward_features`` into sequential stages.

    Args:
        model: A timm model (any family whose ``forward_features`` torch.fx can trace with timm's set-up), or a
            model of a family registered with :func:`loco_timm.register_stage_adapter`.
        num_stages: Number of stages K. Default: the model's ``feature_info`` levels with the stem merged into the
            first (ResNet-50: 4), or 4 equal groups of blocks for a model without downsampling levels (ViT).
        first_blocks: Also cut every stage but the first after its first ``first_blocks`` blocks, so stage k >= 1
            becomes two: its head blocks and the rest (LoCo's ablation sharing only part of the next stage).
            Traced models only.
        input_size: ``(C, H, W)`` of the inputs, for a model whose ``forward_features`` branches on tensor shapes
            (Gemma 4's ViT): its stages are traced for this size and refuse another with one line (default: the
            model's data config). Other models' stages take any size the model takes.

    Returns:
        ``nn.ModuleList`` of K stages sharing the model's modules and parameters. Applying them in order equals
        ``model.forward_features(x)``. A stage returns a tensor, or a :class:`~loco_timm.core.stages.Boundary` when
        more than one value crosses the cut after it.

    Raises:
        ValueError: One line naming the model and why it cannot be split, or the range ``num_stages`` must be in.
    """
    if find_adapter(model) is not None:
        if first_blocks:
            raise ValueError(f'first_blocks: {type(model).__name__} is split by a registered adapter, which cuts '
                             f'only where its atoms end; use the traced splitter (unregister the adapter)')
        return split_atoms(model, num_stages)
    traced = trace_features(model, input_size)
    levels, all_levels = default_levels(model, traced)
    cuts = [traced.ends[f['module']] for f in levels[:-1]]
    flat = len({f.get('reduction') for f in all_levels}) < 2  # a ViT: every level (block) may end a stage
    blocks = sorted(set(_block_ends(model, traced, levels)) | (
        {traced.ends[f['module']] for f in all_levels[:-1]} if flat else set()))
    candidates = sorted(set(blocks) | set(cuts))
    max_stages = len(candidates) + 1
    if num_stages is None and len(cuts) < 1 and blocks:
        num_stages = 2  # one level only: split its blocks in two
    if num_stages is not None:
        check_num_stages(model, num_stages, max_stages)
        if num_stages <= len(cuts) + 1:  # merge neighbouring default stages
            sizes = equal_groups(len(cuts) + 1, num_stages)
            cuts = [cuts[sum(sizes[:i + 1]) - 1] for i in range(num_stages - 1)]
        while len(cuts) + 1 < num_stages:  # split the stage with the most blocks at its middle block
            bounds = [-1] + cuts + [len(traced.graph.nodes)]
            options = [[c for c in blocks if bounds[i] < c < bounds[i + 1]] for i in range(len(bounds) - 1)]
            best = max(range(len(options)), key=lambda i: len(options[i]))
            cuts = sorted(cuts + [options[best][(len(options[best]) - 1) // 2]])
    if first_blocks:
        cuts = _cut_first_blocks(model, traced, cuts, blocks, first_blocks)
    names = list(traced.ends)
    cut_modules = [_module_at(traced, end, [f['module'] for f in all_levels] + names) for end in cuts]
    split = GraphSplit(model, cut_modules, traced, input_size)
    stages = split.stages()
    for stage, level in zip(stages, _stage_levels(model, levels, all_levels, cut_modules)):
        stage.feature_info = level
    return stages


def _stage_levels(model: nn.Module, levels: list[dict], all_levels: list[dict],
                  cut_modules: list[str]) -> list[dict | None]:
    """Per stage, the feature_info entry of the module it ends with (the last stage: the model's features)."""
    by_module = {f['module']: f for f in all_levels}
    last = dict(levels[-1], num_chs=getattr(model, 'num_features', levels[-1].get('num_chs')))
    return [by_module.get(m) for m in cut_modules] + [last]
