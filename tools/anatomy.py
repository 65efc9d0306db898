"""What a weight tag's network looks like to the local units: its stages as the splitter finds them, the map each one
hands on, the share of the multiply-adds each one does, its normalisation and its attention.

The cross-family table (``benchmarks/families.py``) sets these beside each family's results, so that a reading of
where LoCo falls behind rests on measured properties (stage count, stage balance, normalisation, attention), not on
a description of the architecture."""
from __future__ import annotations

import math

import torch
from timm.models.resnet import Bottleneck
from timm.models.vision_transformer import Block
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from loco_timm import LocalLearner
from loco_timm.core.stages import prefix_tokens, stage_feature
from tools.macs import SDPA_FLOPS, build, recipe_of


def _grid(feature: torch.Tensor, layout: str, input_size: tuple[int, int, int]) -> str:
    """The positions of one image's feature: ``HxW`` for a map, the token grid (prefix tokens left out) else."""
    shape = tuple(feature.shape[1:])
    if layout == 'NCHW':
        return f'{shape[1]}x{shape[2]}'
    if layout == 'NHWC':
        return f'{shape[0]}x{shape[1]}'
    if layout == 'NLC':
        side = math.isqrt(shape[0] - prefix_tokens(shape[0], input_size))
        return f'{side}x{side}'
    return '1x1'


ATTENTION = ('Attention', 'Attention2d', 'AttentionCl')  # timm's self-attention modules (not squeeze-excite)
NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)  # timm's norms derive from these


def _named_attention(module: nn.Module) -> bool:
    return type(module).__name__.endswith(ATTENTION)


def _is_attention(module: nn.Module) -> bool:
    """An innermost self-attention module (MaxViT's ``PartitionAttentionCl`` holds an ``AttentionCl``: one)."""
    return _named_attention(module) and not any(_named_attention(m) for m in list(module.modules())[1:])


def _kinds(model: nn.Module, is_kind) -> dict[str, int]:
    """Class name -> count of the model's modules of a kind, most frequent first."""
    counts: dict[str, int] = {}
    for module in model.modules():
        if is_kind(module):
            counts[type(module).__name__] = counts.get(type(module).__name__, 0) + 1
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def _decoder_block(decoder: nn.Module) -> str:
    """What the conv decoder puts before its pooling on this layout: timm's ResNet bottleneck, a ViT block, or none."""
    blocks = [type(m).__name__ for m in decoder.modules() if isinstance(m, (Bottleneck, Block))]
    return blocks[0] if blocks else 'none'


def anatomy(tag: str) -> dict:
    """Per stage of the tag's model at the recipe's input size (its local units' building blocks): the feature's
    positions, channels and layout, the block the conv decoder puts on it (a GIM learner has one per stage), the
    multiply-adds (torch's FLOP counter / 2, scaled dot-product attention counted), and the stage's normalisation
    layers and self-attention modules (class name -> count, most frequent first)."""
    cfg = recipe_of(tag)
    size = (1, cfg.image_size, cfg.image_size)
    learner = LocalLearner(build(tag), 'gim', decoder='conv', input_size=size, num_stages=cfg.num_stages).eval()
    h, grids, channels, macs = torch.zeros(1, *size), [], [], []
    with torch.no_grad():
        for stage, layout in zip(learner.stages, learner.layouts):
            with FlopCounterMode(display=False, custom_mapping=SDPA_FLOPS) as counter:
                h = stage(h)
            macs.append(counter.get_total_flops() // 2)
            feature = stage_feature(h)
            if isinstance(feature, tuple):  # a level of several tensors: its first (the layout says how to read it)
                feature, layout = feature[0], layout[0]
            grids.append(_grid(feature, layout, size))
            channels.append(feature.shape[-1] if layout in ('NHWC', 'NLC') else feature.shape[1])
    owners = [{id(p) for p in stage.parameters()} for stage in learner.stages]  # a traced stage may call a module's
    # functions rather than the module: a module is in the stage whose parameters it holds
    in_stage = [lambda m, ids=ids: any(id(p) in ids for p in m.parameters()) for ids in owners]
    return dict(stages=len(macs), grids=grids, channels=channels, macs=macs, layouts=learner.layouts,
                decoders=[_decoder_block(d) for d in learner.decoders],
                norms=[_kinds(learner.encoder, lambda m, s=s: isinstance(m, NORMS) and s(m)) for s in in_stage],
                attention=[_kinds(learner.encoder, lambda m, s=s: _is_attention(m) and s(m)) for s in in_stage])
