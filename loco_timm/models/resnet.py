"""The ResNets of loco-timm: the paper's ResNet-50 and a ResNet-18 for small images.

LoCo: Local Contrastive Representation Learning (Xiong, Ren & Urtasun, NeurIPS 2020, arXiv:2008.01342).

* ``loco_resnet50``: the paper's encoder, timm's ResNet-50 (the exported repositories name ``resnet50``, so plain
  timm loads them too).
* ``loco_resnet18_small``: a ResNet-18 (BasicBlock, 2-2-2-2) for small images such as Fashion-MNIST's 28 px: deep
  3x3 stem (8-8-16 channels) at stride 2, no max-pool, widths 16-32-64-256, so its feature maps are 14, 7, 4 and
  2 px (``stem_stride=1`` doubles them). Its head pools the 2x2 map by concatenated average and max pooling (timm's
  ``fastcatavgmax``, 512 features, scriptable): on a map this small, max pooling keeps where a part responds, which
  an average loses. timm's ResNet cannot express a stem without max-pool, so loading it needs ``import loco_timm``.
"""
from __future__ import annotations

from typing import Any

from timm.models import register_model
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from torch import nn

from ._builder import create, loco_default_cfgs

__all__ = ['SmallImageResNet', 'RESNETS']


class SmallImageResNet(ResNet):
    """timm's ResNet without the stem max-pool and with a configurable stem stride, for images of about 32 px."""

    def __init__(self, *args: Any, stem_stride: int = 2, **kwargs: Any):
        super().__init__(*args, **kwargs)
        first = self.conv1[0] if isinstance(self.conv1, nn.Sequential) else self.conv1
        first.stride = (stem_stride, stem_stride)
        self.maxpool = nn.Identity()
        for info in self.feature_info:  # the stem no longer reduces by 4
            info['reduction'] = stem_stride * (max(info['reduction'] // 4, 1) if info['module'] != 'act1' else 1)


# architecture facts of the pretrained config; the tag's facts come from its hub config
RESNETS: dict[str, dict[str, Any]] = {
    'loco_resnet18_small': dict(first_conv='conv1.0', classifier='fc', pool_size=(2, 2), input_size=(1, 28, 28),
                                num_classes=10, crop_pct=1.0, mean=(0.2860,), std=(0.3530,)),
    'loco_resnet50': dict(first_conv='conv1', classifier='fc', pool_size=(7, 7), input_size=(3, 224, 224),
                          num_classes=1000, crop_pct=0.875, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
}


default_cfgs = loco_default_cfgs(RESNETS)


@register_model
def loco_resnet18_small(pretrained: bool = False, **kwargs: Any) -> SmallImageResNet:
    """ResNet-18 for small images (deep stem at stride 2, no max-pool), widths 16-32-64-256, avg+max pooled head."""
    model_args = dict(block=BasicBlock, layers=(2, 2, 2, 2), channels=(16, 32, 64, 256), stem_type='deep',
                      stem_width=8, in_chans=1, num_classes=10, global_pool='fastcatavgmax')
    return create(SmallImageResNet, 'loco_resnet18_small', pretrained, **dict(model_args, **kwargs))


@register_model
def loco_resnet50(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNet-50, the paper's encoder (timm's ``resnet50``)."""
    model_args = dict(block=Bottleneck, layers=(3, 4, 6, 3))
    return create(ResNet, 'loco_resnet50', pretrained, **dict(model_args, **kwargs))

