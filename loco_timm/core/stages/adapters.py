"""Stage adapters: a model family's ``forward_features`` listed by hand as *atoms*.

timm's families need none: the generic splitter (:mod:`loco_timm.core.stages.graph`) traces ``forward_features`` and
cuts it after timm's ``feature_info`` modules. An adapter is how a user teaches :func:`~loco_timm.split_stages` a
model the tracer cannot follow (data-dependent control flow), or overrides where a family is cut: it lists the
modules ``forward_features`` applies one after another, at block granularity (``conv1``, ``bn1``, ...,
``layer1.0``, ``layer1.1``, ...), sharing every module with the model; the stages are then ``nn.Sequential``
chains of atoms. Atoms without a dot in their name form the stem; a stage may end after any block. Default cut
points come from ``feature_info`` with the stem's levels merged into the first stage; a model without a
downsampling hierarchy has its blocks grouped into 4 equal stages.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from torch import nn

__all__ = ['register_stage_adapter', 'supported_families', 'stage_atoms', 'find_adapter', 'split_atoms', 'equal_groups',
           'check_num_stages']

# An adapter returns the model's atoms: (dotted name, module) in forward_features order.
Atoms = list[tuple[str, nn.Module]]
StemLevels = Callable[[nn.Module], set]
_ADAPTERS: OrderedDict[type, tuple[str, Callable[[nn.Module], Atoms], StemLevels | None]] = OrderedDict()


def register_stage_adapter(cls: type, family: str | None = None,
                           stem_levels: StemLevels | None = None) -> Callable[[Callable], Callable]:
    """Register a function listing the atoms of ``cls.forward_features`` (decorator).

    Atoms without a dot in their name form the stem; dotted atoms are blocks (``layer1.0``), and a stage may end
    after any block. ``feature_info`` levels inside the stem are merged into the first stage.

    Args:
        cls: The model class (subclasses match too).
        family: Name shown in error messages; defaults to the class name.
        stem_levels: Optional ``fn(model) -> set of feature_info module names`` that also belong to the stem.

    Returns:
        A decorator that registers ``fn(model) -> list[(name, module)]`` and returns it unchanged.

    Example::

        @register_stage_adapter(MyNet, 'MyNet')
        def my_atoms(model):
            return [('stem', model.stem)] + [(f'blocks.{i}', b) for i, b in enumerate(model.blocks)]
    """
    def _register(fn: Callable[[nn.Module], Atoms]) -> Callable[[nn.Module], Atoms]:
        _ADAPTERS[cls] = (family or cls.__name__, fn, stem_levels)
        return fn
    return _register


def supported_families() -> list[str]:
    """Names of the model families split by a registered adapter (every other family goes through the generic
    splitter; ``benchmarks/coverage.py`` reports which of timm's families it handles)."""
    return [entry[0] for entry in _ADAPTERS.values()]


def find_adapter(model: nn.Module) -> tuple | None:
    """The (family, atoms function, stem levels) registered for the model's class, or None."""
    for cls in reversed(_ADAPTERS):  # latest registration wins, so users can override a built-in adapter
        if isinstance(model, cls):
            return _ADAPTERS[cls]
    return None


def _adapter(model: nn.Module) -> tuple:
    found = find_adapter(model)
    if found is None:
        raise ValueError(f'no stage adapter is registered for {type(model).__name__}: add one with '
                         f'loco_timm.register_stage_adapter')
    return found


def stage_atoms(model: nn.Module) -> Atoms:
    """The atoms of ``model.forward_features`` in order, from the model family's adapter.

    Raises:
        ValueError: If no adapter knows the model's class.
    """
    return _adapter(model)[1](model)


def _default_cuts(model: nn.Module, names: list[str], first_block: int) -> list[int] | None:
    """Atom indices after which a default stage ends (feature_info levels, stem merged), or None."""
    info = getattr(model, 'feature_info', None) or []
    reductions = {f.get('reduction') for f in info}
    if len(reductions) < 2:  # no downsampling hierarchy (ViT): caller groups blocks equally
        return None
    stem_levels = _adapter(model)[2]
    extra_stem = stem_levels(model) if stem_levels else set()
    cuts = set()
    for level in info:
        module = level['module']
        ends = [i for i, n in enumerate(names)
                if n == module or n.startswith(module + '.') or module.startswith(n + '.')]
        if ends and ends[-1] >= first_block and module not in extra_stem:
            cuts.add(ends[-1])
    return sorted(cuts)


def equal_groups(n: int, k: int) -> list[int]:
    """Sizes of ``k`` near-equal consecutive groups of ``n`` items, larger groups first."""
    return [n // k + (1 if i < n % k else 0) for i in range(k)]


def _group_ranges(num_atoms: int, cuts: list[int]) -> list[tuple[int, int]]:
    bounds = [0] + [c + 1 for c in cuts] + [num_atoms]
    return [(bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]


def split_atoms(model: nn.Module, num_stages: int | None = None) -> nn.ModuleList:
    """Split a model with a registered adapter into ``nn.Sequential`` stages of its atoms (see
    :func:`loco_timm.split_stages` for the arguments)."""
    atoms = stage_atoms(model)
    names = [name for name, _ in atoms]
    # a stage may end after any atom except inside the stem (the atoms before the first block)
    # and not right after a stage's downsampling layer; atoms after the last block (norm, final_conv) never
    # start a stage of their own. Block atoms are the dotted names.
    first_block = next(i for i, n in enumerate(names) if '.' in n)
    last_block = max(i for i, n in enumerate(names) if '.' in n)
    legal_cuts = [c for c in range(first_block, last_block) if not names[c].endswith('.downsample')]
    max_stages = len(legal_cuts) + 1

    cuts = _default_cuts(model, names, first_block)
    if cuts is not None:
        cuts = [c for c in cuts if c in legal_cuts]
    if cuts is None:  # equal groups of blocks
        num_blocks = len(legal_cuts) + 1
        k = num_stages or min(4, num_blocks)
        check_num_stages(model, k, max_stages)
        sizes = equal_groups(num_blocks, k)
        cuts = [legal_cuts[0] + sum(sizes[:i + 1]) - 1 for i in range(k - 1)]
    elif num_stages is not None:
        check_num_stages(model, num_stages, max_stages)
        if num_stages <= len(cuts) + 1:  # merge neighbouring default stages
            sizes = equal_groups(len(cuts) + 1, num_stages)
            cuts = [cuts[sum(sizes[:i + 1]) - 1] for i in range(num_stages - 1)]
        else:  # split the stage with the most blocks at its middle block boundary
            cuts = list(cuts)
            while len(cuts) + 1 < num_stages:
                ranges = _group_ranges(len(atoms), cuts)
                options = [[c for c in legal_cuts if lo <= c < hi - 1] for lo, hi in ranges]
                best = max(range(len(options)), key=lambda i: len(options[i]))
                cuts = sorted(cuts + [options[best][len(options[best]) // 2]])
    stages = nn.ModuleList()
    for lo, hi in _group_ranges(len(atoms), cuts):
        stages.append(nn.Sequential(OrderedDict((n.replace('.', '_'), m) for n, m in atoms[lo:hi])))
    return stages


def check_num_stages(model: nn.Module, k: int, max_stages: int) -> None:
    if not isinstance(k, int) or not 1 <= k <= max_stages:
        raise ValueError(
            f'num_stages={k!r} does not fit {type(model).__name__}: it can be split into 1 to {max_stages} '
            f'stages (at block boundaries); pass a value in that range or None for the default')
