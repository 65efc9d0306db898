"""ShuffleNet v2-50, the LoCo paper's second encoder (timm has no ShuffleNet).

ShuffleNet V2: Practical Guidelines for Efficient CNN Architecture Design (Ma et al., ECCV 2018, arXiv:1807.11164),
appendix: the 50-layer large model; used by LoCo (Xiong, Ren & Urtasun, NeurIPS 2020, arXiv:2008.01342, Table 1:
SimCLR 69.1, GIM 63.5, LoCo 69.3 linear top-1 after 800 epochs).

Layout at 224 px: conv1 3x3, 64, stride 2 (+BN, ReLU) -> 112; 3x3 max pool, stride 2 -> 56; four stages of plain
ShuffleNet v2 units with output widths 244, 488, 976, 1952 and 3, 4, 6, 3 units (paper names: stage 2 to stage 5;
here ``stages.0`` to ``stages.3``) at 56, 28, 14, 7 px; conv6 1x1, 2048 (+BN, ReLU); global average pool; fc. The
first unit of each stage is the two-branch downsampling unit, at stride 1 in the first stage (which stays at 56 px
after the pool) and stride 2 after. Every other unit splits its channels in halves, passes one half through and the
other through 1x1 -> 3x3 depthwise -> 1x1 (no residual addition, no SE), concatenates and shuffles the channels.
The 50 layers: conv1, 16 units x 3 convolutions on the main branch and conv6 (the four downsampling units' second
branches, 3x3 depthwise -> 1x1, and the fc not counted).

``feature_info`` has four levels: the outputs of stages 2, 3, 4 and of conv6. conv6 belongs to the last level
(stage 5 + conv6) because the 2048-d map it produces is what the head pools and the linear readout reads: the last
local unit's loss must be on that representation, as LoCo's last unit is on ResNet-50's res5 output. So the default
LoCo stages are conv1+stage 2, stage 3, stage 4, stage 5+conv6, each ending at a ``feature_info`` level.
"""
from __future__ import annotations

from typing import Any

import torch
from timm.layers import ConvNormAct
from timm.models import register_model
from torch import nn

from ._builder import create, loco_default_cfgs
from ._staged import StagedNet, build_on

__all__ = ['ShuffleUnit', 'ShuffleNetV2']


def channel_shuffle(x: torch.Tensor, groups: int = 2) -> torch.Tensor:
    """Interleave the channels of ``groups`` equal groups (NCHW)."""
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class ShuffleUnit(nn.Module):
    """One ShuffleNet v2 unit.

    A basic unit (``downsample=False``; ``in_chs == out_chs``, stride 1) splits the channels in halves, keeps the
    first and sends the second through 1x1 -> 3x3 depthwise -> 1x1; a downsampling unit sends the whole input
    through that branch and through a second one (3x3 depthwise -> 1x1), each giving ``out_chs / 2`` channels at
    ``stride``. The halves are concatenated and shuffled.
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, downsample: bool = False):
        super().__init__()
        if out_chs % 2 or (not downsample and (in_chs != out_chs or stride != 1)):
            raise ValueError(f'ShuffleUnit({in_chs}, {out_chs}, stride={stride}, downsample={downsample}): a basic '
                             f'unit keeps width and size, and the width must be even')
        half = out_chs // 2
        branch_in = in_chs if downsample else half
        self.downsample = downsample
        self.branch_proj = nn.Sequential(  # only in downsampling units: 3x3 depthwise -> 1x1
            ConvNormAct(in_chs, in_chs, 3, stride=stride, groups=in_chs, apply_act=False),
            ConvNormAct(in_chs, half, 1),
        ) if downsample else nn.Identity()
        self.branch_main = nn.Sequential(
            ConvNormAct(branch_in, half, 1),
            ConvNormAct(half, half, 3, stride=stride, groups=half, apply_act=False),
            ConvNormAct(half, half, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample:
            out = torch.cat([self.branch_proj(x), self.branch_main(x)], dim=1)
        else:
            keep, work = x.chunk(2, dim=1)
            out = torch.cat([keep, self.branch_main(work)], dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(StagedNet):
    """ShuffleNet v2 with a conv1 + max-pool stem, stages of :class:`ShuffleUnit`, a 1x1 conv6 and a linear head.

    Args:
        widths: Output channels of the stages.
        depths: Units per stage (the first one downsamples).
        stem_width: conv1's channels.
        num_features: conv6's channels (what the head pools).
        num_classes: Classifier outputs (0: no classifier).
        in_chans: Input channels.
        global_pool: timm pooling type of the head.
        drop_rate: Dropout before the classifier.
        device: Where the parameters are created (``'meta'``: nowhere).
        dtype: The parameters' floating-point type.
    """

    def __init__(self, widths: tuple[int, ...] = (244, 488, 976, 1952), depths: tuple[int, ...] = (3, 4, 6, 3),
                 stem_width: int = 64, num_features: int = 2048, num_classes: int = 1000, in_chans: int = 3,
                 global_pool: str = 'avg', drop_rate: float = 0.0, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        with build_on(device):
            self._build(widths, depths, stem_width, num_features, num_classes, in_chans, global_pool, drop_rate)
        if dtype is not None:
            self.to(dtype=dtype)

    def _build(self, widths: tuple[int, ...], depths: tuple[int, ...], stem_width: int, num_features: int,
               num_classes: int, in_chans: int, global_pool: str, drop_rate: float) -> None:
        self.num_classes, self.drop_rate = num_classes, drop_rate
        self.grad_checkpointing = False
        self.conv1 = ConvNormAct(in_chans, stem_width, 3, stride=2)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        stages, in_chs, reduction = [], stem_width, 4
        self.feature_info = []
        for i, (width, depth) in enumerate(zip(widths, depths)):
            stride = 1 if i == 0 else 2
            reduction *= stride
            units = [ShuffleUnit(in_chs, width, stride, downsample=True)]
            units += [ShuffleUnit(width, width) for _ in range(depth - 1)]
            stages.append(nn.Sequential(*units))
            in_chs = width
            if i < len(widths) - 1:
                self.feature_info.append(dict(num_chs=width, reduction=reduction, module=f'stages.{i}'))
        self.stages = nn.Sequential(*stages)
        self.conv6 = ConvNormAct(in_chs, num_features, 1)
        self.feature_info.append(dict(num_chs=num_features, reduction=reduction, module='conv6'))
        self._init_head(num_features, num_classes, global_pool, drop_rate)

    def forward_tail(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv6(x)

    def _remove_tail(self) -> None:
        self.conv6 = nn.Identity()


# architecture facts of the pretrained config; the tag's facts come from its hub config
ARCHITECTURES: dict[str, dict[str, Any]] = {
    'loco_shufflenet_v2_50': dict(first_conv='conv1.conv', classifier='head.fc', pool_size=(7, 7),
                                  input_size=(3, 224, 224), num_classes=1000, crop_pct=0.875,
                                  mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
}

default_cfgs = loco_default_cfgs(ARCHITECTURES)


@register_model
def loco_shufflenet_v2_50(pretrained: bool = False, **kwargs: Any) -> ShuffleNetV2:
    """ShuffleNet v2-50: widths 244-488-976-1952, 3-4-6-3 units, conv6 2048 (the LoCo paper's second encoder)."""
    model_args = dict(widths=(244, 488, 976, 1952), depths=(3, 4, 6, 3), stem_width=64, num_features=2048)
    return create(ShuffleNetV2, 'loco_shufflenet_v2_50', pretrained,
                  feature_cfg=dict(flatten_sequential=True, out_indices=(0, 1, 2, 3)), **dict(model_args, **kwargs))
