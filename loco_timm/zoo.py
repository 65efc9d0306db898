"""Model zoo: timm registrations of the architectures loco-timm trains.

* ``loco_resnet18_small``: a ResNet-18 (BasicBlock, 2-2-2-2) for small images such as Fashion-MNIST's 28 px: deep
  3x3 stem (8-8-16 channels) at stride 2, no max-pool, widths 16-32-64-256, so its feature maps are 14, 7, 4 and
  2 px (``stem_stride=1`` doubles them). Sized so that LoCo pre-training on Fashion-MNIST runs in minutes on 2 CPU
  cores. timm's ResNet cannot express a stem without max-pool, so loading it needs ``import loco_timm``.
"""
from __future__ import annotations

from typing import Any

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, ResNet
from torch import nn

__all__ = ['SmallImageResNet']


class SmallImageResNet(ResNet):
    """timm's ResNet without the stem max-pool and with a configurable stem stride, for images of about 32 px."""

    def __init__(self, *args: Any, stem_stride: int = 2, **kwargs: Any):
        super().__init__(*args, **kwargs)
        first = self.conv1[0] if isinstance(self.conv1, nn.Sequential) else self.conv1
        first.stride = (stem_stride, stem_stride)
        self.maxpool = nn.Identity()
        for info in self.feature_info:  # the stem no longer reduces by 4
            info['reduction'] = stem_stride * (max(info['reduction'] // 4, 1) if info['module'] != 'act1' else 1)


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        'url': '', 'num_classes': 10, 'input_size': (1, 28, 28), 'pool_size': (2, 2), 'crop_pct': 1.0,
        'interpolation': 'bilinear', 'mean': (0.2860,), 'std': (0.3530,), 'first_conv': 'conv1.0',
        'classifier': 'fc', 'license': 'apache-2.0', **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'loco_resnet18_small.untrained': _cfg(),
})


def _create_small_resnet(variant: str, pretrained: bool = False, **kwargs: Any) -> SmallImageResNet:
    return build_model_with_cfg(SmallImageResNet, variant, pretrained, **kwargs)


@register_model
def loco_resnet18_small(pretrained: bool = False, **kwargs: Any) -> SmallImageResNet:
    """ResNet-18 for small images (deep stem at stride 2, no max-pool), widths 16-32-64-256, 1 input channel."""
    model_args = dict(block=BasicBlock, layers=(2, 2, 2, 2), channels=(16, 32, 64, 256), stem_type='deep',
                      stem_width=8, in_chans=1, num_classes=10)
    return _create_small_resnet('loco_resnet18_small', pretrained, **dict(model_args, **kwargs))
