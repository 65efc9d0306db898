"""What crosses a cut between two stages, and the layout of a stage's feature.

A stage's output is either one tensor (a plain chain: ResNet, ConvNeXt, ...) or a :class:`Boundary`: every value
the later stages still read (the level's feature, a skip connection, a token count, an HRNet branch ...), with the
feature marked among them. The learner detaches every tensor of a boundary before the next stage reads it, so no
gradient crosses a unit's input, and hands the decoder only the feature.

A feature's layout is named from its per-image shape and the channel count timm's ``feature_info`` gives for it:
``"NCHW"`` maps, ``"NHWC"`` maps (Swin, MambaOut, ...), ``"NLC"`` token sequences (ViTs; prefix tokens included),
``"NC"`` vectors, or a tuple of those for a level with several tensors (``"multi"``).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

__all__ = ['Boundary', 'stage_tensors', 'stage_feature', 'detach_stage_output', 'feature_layout']


class Boundary(NamedTuple):
    """Everything a stage hands to the next one.

    Attributes:
        values: The values the later stages read, in a fixed order (tensors, and plain values such as sizes).
        feature: Index into ``values`` of the level's feature, or a tuple of indices for a level of several tensors.
    """
    values: tuple
    feature: int | tuple[int, ...]

    def features(self) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """The feature: one tensor, or a tuple of the tensors of a level that returns several values (sizes and
        other plain values left out)."""
        if isinstance(self.feature, int):
            return self.values[self.feature]
        tensors = tuple(self.values[i] for i in self.feature if isinstance(self.values[i], torch.Tensor))
        return tensors[0] if len(tensors) == 1 else tensors


def stage_tensors(output: Any) -> list[torch.Tensor]:
    """The tensors of a stage output in a fixed order (for a boundary: those among its values)."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, Boundary):
        output = output.values
    if isinstance(output, (tuple, list)):
        return [t for v in output for t in stage_tensors(v)]
    return []


def stage_feature(output: Any) -> Any:
    """The feature of a stage output: the tensor itself, or a boundary's feature."""
    return output.features() if isinstance(output, Boundary) else output


def _detach(value: Any, requires_grad: bool) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.detach()
        return value.requires_grad_(requires_grad) if value.is_floating_point() or value.is_complex() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_detach(v, requires_grad) for v in value)
    return value


def detach_stage_output(output: Any, requires_grad: bool = False) -> Any:
    """The same stage output with every tensor detached; floating tensors become leaves that require grad when
    ``requires_grad``. Plain values pass unchanged."""
    if isinstance(output, Boundary):
        return Boundary(_detach(output.values, requires_grad), output.feature)
    return _detach(output, requires_grad)


def feature_layout(shape: Sequence, channels: int | None = None, channels_last: bool = False) -> Any:
    """The layout of a feature from its per-image shape (a tuple of shapes for a level of several tensors).

    Args:
        shape: ``(C, H, W)``, ``(H, W, C)``, ``(N, C)``, ``(C,)``, or a tuple of such shapes.
        channels: The feature's channel count (timm's ``feature_info`` ``num_chs``), when known.
        channels_last: The model says its maps are NHWC (timm's ``output_fmt``); decides 4-d shapes whose channel
            count is not known or fits both positions.

    Raises:
        ValueError: For a shape no decoder can read.
    """
    if shape and isinstance(shape[0], (tuple, list)):
        return tuple(feature_layout(s, None, channels_last) for s in shape)
    if len(shape) == 3:
        first, last = shape[0] == channels, shape[-1] == channels
        if channels is not None and first != last:
            return 'NHWC' if last else 'NCHW'
        return 'NHWC' if channels_last else 'NCHW'
    if len(shape) == 2:
        return 'NLC'
    if len(shape) == 1:
        return 'NC'
    raise ValueError(f'cannot decode a stage feature of shape {tuple(shape)}: expected (C, H, W), (H, W, C), '
                     f'(N, C) or (C,)')


MAX_PREFIX_TOKENS = 16  # class, distillation and register tokens in front of the patch tokens


def prefix_tokens(tokens: int, input_size: Sequence[int], reduction: int | None = None) -> int:
    """How many tokens of an ``(N, C)`` feature come before its patch tokens (class, distillation, register tokens),
    found from the feature itself: ``tokens`` against the patch grid of an ``(H, W)`` input at the level's
    ``reduction`` (timm's ``feature_info``), else against the largest square grid that fits (a branch with its own
    patch size, as CrossViT's); 0 where neither leaves at most :data:`MAX_PREFIX_TOKENS`."""
    height, width = input_size[-2:]
    grids = [(height // reduction) * (width // reduction)] if reduction else []
    grids.append(math.isqrt(tokens) ** 2)
    for grid in grids:
        if grid and 0 <= tokens - grid <= MAX_PREFIX_TOKENS:
            return tokens - grid
    return 0
