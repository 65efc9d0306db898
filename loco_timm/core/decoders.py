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

Every stage feature layout is read: NCHW and NHWC maps (the conv block runs on NCHW), token sequences, vectors, and
features of several tensors (each tensor pooled, the vectors concatenated before the MLP).

``LocalLearner.summary()`` reports the measured widths, parameters and FLOPs of every decoder of a learner.
The blocks here are plain modules without any trainer logic.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.layers import LayerNorm2d
from timm.models.resnet import Bottleneck
from timm.models.vision_transformer import Block
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ['DECODERS', 'NORMS', 'LAYOUTS', 'Pool', 'ToNCHW', 'ProjectionMLP', 'LocalDecoder', 'create_decoder',
           'attention_heads', 'count_flops']

DECODERS = ('mlp', 'conv')
NORMS = ('batch', 'layer', 'none')
LAYOUTS = ('NCHW', 'NHWC', 'NLC', 'NC')


def _norm1d(kind: str, dim: int) -> nn.Module:
    return {'batch': nn.BatchNorm1d, 'layer': nn.LayerNorm, 'none': nn.Identity}[kind](dim)


def _norm2d_layer(kind: str) -> type[nn.Module]:
    return {'batch': nn.BatchNorm2d, 'layer': LayerNorm2d, 'none': nn.Identity}[kind]


class Pool(nn.Module):
    """Global pooling of a stage feature to one vector per image.

    Args:
        kind: ``"avg"`` (mean over positions or patch tokens) or ``"token"`` (the first token, ViT's class token;
            a feature without prefix tokens is averaged).
        num_prefix_tokens: Class/register tokens in front of the patch tokens (left out of the average).
        layout: ``"NCHW"``, ``"NHWC"``, ``"NLC"`` (tokens) or ``"NC"`` (already a vector); None: NCHW for 4-d
            input, tokens for 3-d.
    """

    def __init__(self, kind: str = 'avg', num_prefix_tokens: int = 0, layout: str | None = None):
        super().__init__()
        if kind not in ('avg', 'token'):
            raise ValueError(f'unknown pooling {kind!r}: use "avg" or "token"')
        if layout not in (None,) + LAYOUTS:
            raise ValueError(f'unknown layout {layout!r}: use one of {", ".join(LAYOUTS)}')
        self.kind = kind
        self.num_prefix_tokens = num_prefix_tokens
        self.layout = layout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layout = self.layout or {4: 'NCHW', 3: 'NLC', 2: 'NC'}.get(x.ndim)
        if layout == 'NCHW':
            return x.mean(dim=(2, 3))
        if layout == 'NHWC':
            return x.mean(dim=(1, 2))
        if layout == 'NC':
            return x
        if self.kind == 'token' and self.num_prefix_tokens:
            return x[:, 0]
        return x[:, self.num_prefix_tokens:].mean(dim=1) if x.shape[1] > self.num_prefix_tokens else x.mean(dim=1)


class ToNCHW(nn.Module):
    """NHWC maps to NCHW (before a conv decoder block)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 3, 1, 2)


class ProjectionMLP(nn.Module):
    """SimCLR projection head: Linear -> norm -> ReLU -> Linear, or with ``layers > 2`` further hidden
    Linear -> norm -> ReLU layers before the last Linear (the paper's "2-layer MLP added": ``layers=4``).

    Args:
        in_dim: Input width.
        hidden_dim: Hidden width (default: ``in_dim``).
        out_dim: Embedding width.
        norm: ``"batch"`` (SimCLR), ``"layer"`` or ``"none"``; ``"batch"`` uses per-process batch statistics.
        layers: Linear layers in all (at least 2).
    """

    def __init__(self, in_dim: int, hidden_dim: int | None = None, out_dim: int = 128, norm: str = 'batch',
                 layers: int = 2):
        super().__init__()
        if layers < 2:
            raise ValueError(f'mlp_layers={layers}: a projection MLP has at least 2 linear layers')
        hidden_dim = hidden_dim or in_dim
        self.fc1 = nn.Linear(in_dim, hidden_dim, bias=norm == 'none')
        self.norm = _norm1d(norm, hidden_dim)
        self.act = nn.ReLU(inplace=True)
        if layers > 2:  # absent for the SimCLR head, so its state dict keeps its keys
            self.hidden = nn.Sequential(*[nn.Sequential(nn.Linear(hidden_dim, hidden_dim, bias=norm == 'none'),
                                                        _norm1d(norm, hidden_dim), nn.ReLU(inplace=True))
                                          for _ in range(layers - 2)])
        self.fc2 = nn.Linear(hidden_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.norm(self.fc1(x)))
        if 'hidden' in self._modules:
            x = self.hidden(x)
        return self.fc2(x)


class LocalDecoder(nn.Module):
    """Optional block, pooling and projection MLP: maps a stage feature to an embedding for the contrastive loss.
    For a feature of several tensors (``blocks`` and ``pool`` as lists), each tensor has its block and pooling, and
    the pooled vectors are concatenated before the MLP."""

    def __init__(self, block: nn.Module | list | None, pool: Pool | list, mlp: ProjectionMLP):
        super().__init__()
        self.multi = isinstance(pool, (list, tuple))
        if self.multi:
            self.block = nn.ModuleList(b if b is not None else nn.Identity() for b in block)
            self.pool = nn.ModuleList(pool)
        else:
            self.block = block if block is not None else nn.Identity()
            self.pool = pool
        self.mlp = mlp

    def forward(self, x: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        return self.mlp(self.pooled(x))

    def pooled(self, x: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """The vector the MLP reads: the pooled output of the block (concatenated over tensors)."""
        if self.multi:
            return torch.cat([p(b(t)) for b, p, t in zip(self.block, self.pool, x)], dim=1)
        return self.pool(self.block(x))


def _conv_block(channels: int, norm: str, stride: int = 2) -> nn.Module:
    norm_layer = _norm2d_layer(norm)
    planes = max(channels // 4, 1)
    shortcut = None if stride == 1 and channels == planes * 4 else nn.Sequential(
        nn.Conv2d(channels, planes * 4, 1, stride=stride, bias=False), norm_layer(planes * 4))
    return Bottleneck(channels, planes, stride=stride, downsample=shortcut, norm_layer=norm_layer)


def _conv_blocks(channels: int, norm: str, count: int) -> nn.Module:
    """``count`` bottleneck blocks, the first with stride-2 downsampling (one block: the block itself)."""
    blocks = [_conv_block(channels, norm, 2)]
    width = max(channels // 4, 1) * 4
    blocks += [_conv_block(width, norm, 1) for _ in range(count - 1)]
    return blocks[0] if count == 1 else nn.Sequential(*blocks)


def _token_block(dim: int, num_heads: int) -> nn.Module:
    return Block(dim, num_heads, mlp_ratio=4.0, qkv_bias=True)


def attention_heads(width: int) -> int:
    """Heads of a token decoder block on ``width``-wide tokens: heads of about 64 dims (ViT's), the most that divide
    the width (at least 1)."""
    return next(h for h in range(max(width // 64, 1), 0, -1) if width % h == 0)


def _branch(kind: str, shape: Sequence[int], layout: str, norm: str, token_pool: str, num_prefix_tokens: int,
            num_heads: int | None, blocks: int | None = None) -> tuple[nn.Module | None, Pool, int]:
    """(block, pooling, pooled width) for one tensor of a stage feature."""
    count = (1 if kind == 'conv' else 0) if blocks is None else blocks
    if layout in ('NCHW', 'NHWC'):
        channels = shape[0] if layout == 'NCHW' else shape[-1]
        if count:
            block = _conv_blocks(channels, norm, count)
            if layout == 'NHWC':
                block = nn.Sequential(ToNCHW(), block)
            return block, Pool('avg', layout='NCHW'), max(channels // 4, 1) * 4
        return None, Pool('avg', layout=layout), channels
    if layout == 'NLC':
        width = shape[-1]
        heads = num_heads or attention_heads(width)
        block = None if not count else _token_block(width, heads) if count == 1 else nn.Sequential(
            *[_token_block(width, heads) for _ in range(count)])
        return block, Pool(token_pool, num_prefix_tokens, layout='NLC'), width
    if layout == 'NC':
        return None, Pool('avg', layout='NC'), shape[0]
    raise ValueError(f'unknown layout {layout!r}: use one of {", ".join(LAYOUTS)}')


def _check_decoder(kind: str, norm: str, blocks: int | None) -> None:
    if kind not in DECODERS:
        raise ValueError(f'unknown decoder {kind!r}: use one of {", ".join(DECODERS)}')
    if blocks is not None and not (isinstance(blocks, int) and blocks >= 0):
        raise ValueError(f'decoder_blocks={blocks!r} must be a whole number >= 0 (0: pooling and MLP only)')
    if norm not in NORMS:
        raise ValueError(f'unknown decoder norm {norm!r}: use one of {", ".join(NORMS)}')


def create_decoder(
        kind: str,
        feature_shape: Sequence,
        *,
        proj_dim: int = 128,
        hidden_dim: int | None = None,
        norm: str = 'batch',
        token_pool: str = 'token',
        num_prefix_tokens: int | Sequence[int] = 0,
        num_heads: int | None = None,
        layout: str | Sequence[str] | None = None,
        blocks: int | None = None,
        mlp_layers: int = 2,
) -> LocalDecoder:
    """Build a decoder for a stage feature of the given per-image shape and layout.

    Args:
        kind: ``"mlp"`` or ``"conv"`` (see the module docstring).
        feature_shape: The feature's shape without the batch dimension: ``(C, H, W)``, ``(H, W, C)``, tokens
            ``(N, C)``, a vector ``(C,)``, or a tuple of such shapes for a feature of several tensors.
        proj_dim: Output embedding width.
        hidden_dim: MLP hidden width (default: the pooled input width).
        norm: Normalisation inside the decoder: ``"batch"``, ``"layer"`` or ``"none"``.
        token_pool: Pooling of token outputs, ``"token"`` or ``"avg"``.
        num_prefix_tokens: Class/register tokens in front of the patch tokens (one per tensor of a feature of several,
            or one for all; :func:`~loco_timm.core.stages.boundary.prefix_tokens` finds them from the feature).
        num_heads: Attention heads of the ``"conv"`` analogue for tokens (default: :func:`attention_heads`).
        layout: ``"NCHW"``, ``"NHWC"``, ``"NLC"``, ``"NC"`` (a tuple of them for several tensors); None: from the
            shape (3 dims: NCHW, 2: tokens, 1: vector). A vector has no ``"conv"`` block.
        blocks: Conv (token) blocks before the pooling, overriding ``kind``'s (conv: 1, mlp: 0); the first
            downsamples by 2, the others keep the size (the paper's decoder-depth ablation: 0, 1, 2).
        mlp_layers: Linear layers of the projection MLP (2: SimCLR's; 4: the paper's "2-layer MLP added").

    Returns:
        The decoder module.

    Raises:
        ValueError: For an unknown ``kind``, ``norm`` or layout, or an unsupported feature shape.
    """
    _check_decoder(kind, norm, blocks)
    multi = len(feature_shape) > 0 and isinstance(feature_shape[0], (tuple, list))
    shapes = list(feature_shape) if multi else [feature_shape]
    layouts = list(layout) if multi and layout is not None else [layout] * len(shapes)
    prefixes = list(num_prefix_tokens) if isinstance(num_prefix_tokens, (tuple, list)) else \
        [num_prefix_tokens] * len(shapes)
    branches = []
    for shape, lay, prefix in zip(shapes, layouts, prefixes):
        lay = lay or {3: 'NCHW', 2: 'NLC', 1: 'NC'}.get(len(shape))
        if lay is None:
            raise ValueError(f'cannot decode stage outputs of shape {tuple(shape)}: expected (C, H, W), (H, W, C), '
                             f'(N, C) or (C,)')
        branches.append(_branch(kind, shape, lay, norm, token_pool, prefix, num_heads, blocks))
    width = sum(w for _, _, w in branches)
    mlp = ProjectionMLP(width, hidden_dim, proj_dim, norm, mlp_layers)
    if multi:
        return LocalDecoder([b for b, _, _ in branches], [p for _, p, _ in branches], mlp)
    return LocalDecoder(branches[0][0], branches[0][1], mlp)


def count_flops(module: nn.Module, example: torch.Tensor) -> int:
    """Forward FLOPs of ``module(example)`` as counted by ``torch.utils.flop_counter`` (matmuls and convolutions)."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            module(example)
    finally:
        module.train(was_training)
    return counter.get_total_flops()
