"""Local decoders (projection heads) for LoCo / GIM / SimCLR units.

LoCo (arXiv:2008.01342) puts one decoder on top of every local unit:

* ``"mlp"``: global pooling -> Linear(C, H) -> norm -> ReLU -> Linear(H, ``proj_dim``), the SimCLR head. H defaults
  to C (the input width). Parameters: C*H + H*``proj_dim`` (+ norm and biases); FLOPs per image about
  2 * (C*H + H*``proj_dim``).
* ``"conv"``: one residual bottleneck block with stride-2 downsampling (timm's ResNet ``Bottleneck``: 1x1 C->C/4,
  3x3 stride 2, 1x1 C/4->C, projection shortcut 1x1 stride 2) before the pooling, then the same MLP. This is the
  paper's final LoCo/GIM decoder. Parameters about 17/16 * C^2 + 9/16 * C^2; FLOPs per image about
  2 * (17/16 + 9/16) * C^2 * (H_in * W_in / 4) on top of the MLP. For token (ViT) stages the analogue is one extra
  transformer block (timm's ``Block``, width C, the backbone's head count, MLP ratio 4) before token pooling.

``LocalLearner.summary()`` reports the measured widths, parameters and FLOPs of every decoder of a learner.
The blocks here are plain modules without any trainer logic.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

__all__ = ['DECODERS', 'NORMS', 'Pool', 'ProjectionMLP', 'LocalDecoder', 'create_decoder', 'count_flops']

DECODERS = ('mlp', 'conv')
NORMS = ('batch', 'layer', 'none')


def _norm1d(kind: str, dim: int) -> nn.Module:
    return {'batch': nn.BatchNorm1d, 'layer': nn.LayerNorm, 'none': nn.Identity}[kind](dim)


def _norm2d_layer(kind: str) -> type[nn.Module]:
    from timm.layers import LayerNorm2d
    return {'batch': nn.BatchNorm2d, 'layer': LayerNorm2d, 'none': nn.Identity}[kind]


class Pool(nn.Module):
    """Global pooling of a stage output to one vector per image.

    Args:
        kind: ``"avg"`` (mean over positions or patch tokens) or ``"token"`` (the first token, ViT class token).
        num_prefix_tokens: Class/register tokens in front of the patch tokens (ignored by ``"avg"``).
    """

    def __init__(self, kind: str = 'avg', num_prefix_tokens: int = 0):
        super().__init__()
        if kind not in ('avg', 'token'):
            raise ValueError(f'unknown pooling {kind!r}: use "avg" or "token"')
        self.kind = kind
        self.num_prefix_tokens = num_prefix_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 4:  # NCHW
            return x.mean(dim=(2, 3))
        if self.kind == 'token':
            return x[:, 0]
        return x[:, self.num_prefix_tokens:].mean(dim=1)


class ProjectionMLP(nn.Module):
    """SimCLR projection head: Linear -> norm -> ReLU -> Linear.

    Args:
        in_dim: Input width.
        hidden_dim: Hidden width (default: ``in_dim``).
        out_dim: Embedding width.
        norm: ``"batch"`` (SimCLR), ``"layer"`` or ``"none"``; ``"batch"`` uses per-process batch statistics.
    """

    def __init__(self, in_dim: int, hidden_dim: int | None = None, out_dim: int = 128, norm: str = 'batch'):
        super().__init__()
        hidden_dim = hidden_dim or in_dim
        self.fc1 = nn.Linear(in_dim, hidden_dim, bias=norm == 'none')
        self.norm = _norm1d(norm, hidden_dim)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(hidden_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.norm(self.fc1(x))))


class LocalDecoder(nn.Module):
    """Optional block, pooling and projection MLP: maps a stage output to an embedding for the contrastive loss."""

    def __init__(self, block: nn.Module | None, pool: Pool, mlp: ProjectionMLP):
        super().__init__()
        self.block = block if block is not None else nn.Identity()
        self.pool = pool
        self.mlp = mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.pool(self.block(x)))


def _conv_block(channels: int, norm: str) -> nn.Module:
    from timm.models.resnet import Bottleneck
    norm_layer = _norm2d_layer(norm)
    planes = max(channels // 4, 1)
    shortcut = nn.Sequential(nn.Conv2d(channels, planes * 4, 1, stride=2, bias=False), norm_layer(planes * 4))
    return Bottleneck(channels, planes, stride=2, downsample=shortcut, norm_layer=norm_layer)


def _token_block(dim: int, num_heads: int) -> nn.Module:
    from timm.models.vision_transformer import Block
    return Block(dim, num_heads, mlp_ratio=4.0, qkv_bias=True)


def create_decoder(
        kind: str,
        feature_shape: Sequence[int],
        proj_dim: int = 128,
        hidden_dim: int | None = None,
        norm: str = 'batch',
        token_pool: str = 'token',
        num_prefix_tokens: int = 0,
        num_heads: int | None = None,
) -> LocalDecoder:
    """Build a decoder for a stage output of the given per-image shape.

    Args:
        kind: ``"mlp"`` or ``"conv"`` (see the module docstring).
        feature_shape: Stage output shape without the batch dimension: ``(C, H, W)`` or tokens ``(N, C)``.
        proj_dim: Output embedding width.
        hidden_dim: MLP hidden width (default: the pooled input width).
        norm: Normalisation inside the decoder: ``"batch"``, ``"layer"`` or ``"none"``.
        token_pool: Pooling of token outputs, ``"token"`` or ``"avg"``.
        num_prefix_tokens: Class/register tokens in token outputs.
        num_heads: Attention heads of the ``"conv"`` analogue for tokens (default: width // 64, at least 1).

    Returns:
        The decoder module.

    Raises:
        ValueError: For an unknown ``kind`` or ``norm``, or an unsupported feature shape.
    """
    if kind not in DECODERS:
        raise ValueError(f'unknown decoder {kind!r}: use one of {", ".join(DECODERS)}')
    if norm not in NORMS:
        raise ValueError(f'unknown decoder norm {norm!r}: use one of {", ".join(NORMS)}')
    if len(feature_shape) == 3:
        channels = feature_shape[0]
        block = _conv_block(channels, norm) if kind == 'conv' else None
        width = max(channels // 4, 1) * 4 if kind == 'conv' else channels
        pool = Pool('avg')
    elif len(feature_shape) == 2:
        width = feature_shape[1]
        block = _token_block(width, num_heads or max(width // 64, 1)) if kind == 'conv' else None
        pool = Pool(token_pool, num_prefix_tokens)
    else:
        raise ValueError(f'cannot decode stage outputs of shape {tuple(feature_shape)}: expected (C, H, W) or (N, C)')
    return LocalDecoder(block, pool, ProjectionMLP(width, hidden_dim, proj_dim, norm))


def count_flops(module: nn.Module, example: torch.Tensor) -> int:
    """Forward FLOPs of ``module(example)`` as counted by ``torch.utils.flop_counter`` (matmuls and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            module(example)
    finally:
        module.train(was_training)
    return counter.get_total_flops()
