"""Split a timm backbone into sequential stages.

LoCo (Xiong, Ren & Urtasun, NeurIPS 2020, arXiv:2008.01342) and Greedy InfoMax train a network as a chain of
stages. :func:`split_stages` cuts any supported timm model into ``K`` modules whose composition is exactly
``model.forward_features(x)``.

How the cut is found:

* A small adapter per model family lists the *atoms* of ``forward_features``: the modules it applies one after
  another, at block granularity (``conv1``, ``bn1``, ..., ``layer1.0``, ``layer1.1``, ...). The atoms share
  their parameters with the model; nothing is copied.
* The default cut points come from timm's own ``feature_info``: a stage ends where a feature level ends.
  Stem levels (ResNet's ``act1``, RegNet's ``stem``, MobileNet's ``bn1``; for EfficientNet/MobileNet also the
  blocks that still run at the stem's stride) are merged into the first stage, so ResNet-50 gives stem+res2,
  res3, res4, res5. Vision transformers have no downsampling; their blocks are grouped into 4 equal stages.
* ``num_stages`` below the default merges neighbouring stages into near-equal groups; above the default it
  splits the stage with the most blocks at a block boundary until there are enough (e.g. the paper's
  "progressive" 6-stage ResNet-50).

New families are added with :func:`register_stage_adapter`.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch
from torch import nn

__all__ = ['split_stages', 'register_stage_adapter', 'supported_families', 'stage_atoms']

# An adapter returns the model's atoms: (dotted name, module) in forward_features order.
Atoms = list[tuple[str, nn.Module]]
StemLevels = Callable[[nn.Module], set]
_ADAPTERS: 'OrderedDict[type, tuple[str, Callable[[nn.Module], Atoms], StemLevels | None]]' = OrderedDict()


def register_stage_adapter(cls: type, family: str | None = None, stem_levels: StemLevels | None = None):
    """Register a function listing the atoms of ``cls.forward_features`` (decorator).

    Atoms without a dot in their name form the stem; dotted atoms are blocks (``layer1.0``), and a stage may end
    after any block. ``feature_info`` levels inside the stem are merged into the first stage.

    Args:
        cls: The model class (subclasses match too).
        family: Name shown in error messages; defaults to the class name.
        stem_levels: Optional ``fn(model) -> set of feature_info module names`` that also belong to the stem.

    Returns:
        A decorator that registers ``fn(model) -> list[(name, module)]`` and returns it unchanged.
    """
    def _register(fn: Callable[[nn.Module], Atoms]) -> Callable[[nn.Module], Atoms]:
        _ADAPTERS[cls] = (family or cls.__name__, fn, stem_levels)
        return fn
    return _register


def supported_families() -> list[str]:
    """Names of the model families :func:`split_stages` can split."""
    _ensure_builtin_adapters()
    return [entry[0] for entry in _ADAPTERS.values()]


def _blocks(prefix: str, container: nn.Module) -> Atoms:
    return [(f'{prefix}.{name}', module) for name, module in container.named_children()]


def _named(model: nn.Module, *names: str) -> Atoms:
    return [(name, getattr(model, name)) for name in names]


def _register_builtin_adapters() -> None:
    from timm.models import byobnet, convnext, efficientnet, mobilenetv3, nfnet, regnet, resnet
    from timm.models import vision_transformer as vit

    @register_stage_adapter(resnet.ResNet, 'ResNet (ResNet, ResNeXt, ResNet-D, SE-ResNet, ...)')
    def _resnet(model: nn.Module) -> Atoms:
        atoms = _named(model, 'conv1', 'bn1', 'act1', 'maxpool')
        for i in range(1, 5):
            atoms += _blocks(f'layer{i}', getattr(model, f'layer{i}'))
        return atoms

    @register_stage_adapter(convnext.ConvNeXt, 'ConvNeXt')
    def _convnext(model: nn.Module) -> Atoms:
        atoms = _named(model, 'stem')
        for i, stage in enumerate(model.stages):
            atoms += [(f'stages.{i}.downsample', stage.downsample)] + _blocks(f'stages.{i}.blocks', stage.blocks)
        return atoms + _named(model, 'norm_pre')

    def _at_stem_stride(model: nn.Module) -> set:
        stride = model.conv_stem.stride[0]
        return {f['module'] for f in model.feature_info if f['reduction'] <= stride}

    @register_stage_adapter(efficientnet.EfficientNet, 'EfficientNet', _at_stem_stride)
    def _efficientnet(model: nn.Module) -> Atoms:
        return _mobile(model) + _named(model, 'conv_head', 'bn2')

    @register_stage_adapter(mobilenetv3.MobileNetV3, 'MobileNetV3/V4', _at_stem_stride)
    def _mobile(model: nn.Module) -> Atoms:
        atoms = _named(model, 'conv_stem', 'bn1')
        for i, group in enumerate(model.blocks):
            atoms += _blocks(f'blocks.{i}', group)
        return atoms

    @register_stage_adapter(regnet.RegNet, 'RegNet')
    def _regnet(model: nn.Module) -> Atoms:
        atoms = _named(model, 'stem')
        for i in range(1, 5):
            atoms += _blocks(f's{i}', getattr(model, f's{i}'))
        return atoms + _named(model, 'final_conv')

    @register_stage_adapter(byobnet.ByobNet, 'ByobNet (ResNet-ts, RepVGG, GERNet, ...)')
    def _byobnet(model: nn.Module) -> Atoms:
        atoms = _named(model, 'stem')
        for i, stage in enumerate(model.stages):
            atoms += _blocks(f'stages.{i}', stage)
        return atoms + _named(model, 'final_conv')

    @register_stage_adapter(nfnet.NormFreeNet, 'NormFreeNet (NFNet, NF-ResNet)')
    def _nfnet(model: nn.Module) -> Atoms:
        return _byobnet(model) + _named(model, 'final_act')

    @register_stage_adapter(vit.VisionTransformer, 'VisionTransformer (ViT, DeiT)')
    def _vit(model: nn.Module) -> Atoms:
        return [('embed', VitEmbed(model))] + _blocks('blocks', model.blocks) + _named(model, 'norm')


_BUILTINS_REGISTERED = []


def _ensure_builtin_adapters() -> None:
    if not _BUILTINS_REGISTERED:
        _BUILTINS_REGISTERED.append(True)
        user_adapters = dict(_ADAPTERS)  # registered before the built-ins were loaded: keep them winning
        _ADAPTERS.clear()
        _register_builtin_adapters()
        _ADAPTERS.update(user_adapters)


class VitEmbed(nn.Module):
    """The part of a ViT's ``forward_features`` before its blocks: patch embedding, class/register tokens,
    position embedding, patch dropout and pre-norm. Shares every module and parameter with the ViT."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.patch_embed = model.patch_embed
        self.patch_drop = model.patch_drop
        self.norm_pre = model.norm_pre
        for name in ('cls_token', 'reg_token', 'pos_embed'):
            if isinstance(getattr(model, name, None), nn.Parameter):
                self.register_parameter(name, getattr(model, name))
        self.__dict__['_vit'] = model  # not a submodule: its other parameters belong to other stages

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = self.__dict__['_vit']._pos_embed(x)
        x = self.patch_drop(x)
        return self.norm_pre(x)


def _adapter(model: nn.Module) -> tuple:
    _ensure_builtin_adapters()
    for cls in reversed(_ADAPTERS):  # latest registration wins, so users can override a built-in adapter
        if isinstance(model, cls):
            return _ADAPTERS[cls]
    raise ValueError(
        f'cannot split {type(model).__name__} into sequential stages: supported families are '
        f'{", ".join(supported_families())}; add one with loco_timm.register_stage_adapter')


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


def _equal_groups(n: int, k: int) -> list[int]:
    """Sizes of ``k`` near-equal consecutive groups of ``n`` items, larger groups first."""
    return [n // k + (1 if i < n % k else 0) for i in range(k)]


def _group_ranges(num_atoms: int, cuts: list[int]) -> list[tuple[int, int]]:
    bounds = [0] + [c + 1 for c in cuts] + [num_atoms]
    return [(bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]


def split_stages(model: nn.Module, num_stages: int | None = None) -> nn.ModuleList:
    """Split a timm model's ``forward_features`` into sequential stages.

    Args:
        model: A timm model of a supported family (see :func:`supported_families`).
        num_stages: Number of stages K. Default: the model's downsampling stages with the stem merged into
            the first (ResNet-50: 4), or 4 equal groups of blocks for a ViT.

    Returns:
        ``nn.ModuleList`` of K ``nn.Sequential`` stages sharing the model's modules, such that applying them in
        order equals ``model.forward_features(x)``.

    Raises:
        ValueError: If the family is unknown or ``num_stages`` is not between 1 and the number of blocks.
    """
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
        _check_num_stages(model, k, max_stages)
        sizes = _equal_groups(num_blocks, k)
        cuts = [legal_cuts[0] + sum(sizes[:i + 1]) - 1 for i in range(k - 1)]
    elif num_stages is not None:
        _check_num_stages(model, num_stages, max_stages)
        if num_stages <= len(cuts) + 1:  # merge neighbouring default stages
            sizes = _equal_groups(len(cuts) + 1, num_stages)
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


def _check_num_stages(model: nn.Module, k: int, max_stages: int) -> None:
    if not isinstance(k, int) or not 1 <= k <= max_stages:
        raise ValueError(
            f'num_stages={k!r} does not fit {type(model).__name__}: it can be split into 1 to {max_stages} '
            f'stages (at block boundaries); pass a value in that range or None for the default')
