"""Multiply-adds and parameters of a weight tag's model, as the cross-family study compares them.

Used by ``benchmarks/families.py`` (the table) and the tests (every family member stays compute-matched)."""
from __future__ import annotations

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from loco_timm.config import TrainConfig, from_dict, load_recipe


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# torch 2.14's counter has no formula for the kernel F.scaled_dot_product_attention runs on CPU: timm's fused attention
# would count 0 multiply-adds
SDPA_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}


def recipe_of(tag: str) -> TrainConfig:
    """The training recipe of a weight tag (``backbone``, ``model_args`` and ``image_size`` from its hub config)."""
    return from_dict(TrainConfig, load_recipe(tag)['train'])


def build(tag: str) -> torch.nn.Module:
    """The tag's untrained model: one grey channel, ten classes, the tag's ``model_args``."""
    cfg = recipe_of(tag)
    return timm.create_model(cfg.backbone, in_chans=1, num_classes=10, **cfg.model_args)


def macs_and_params(tag: str) -> tuple[int, int]:
    """Multiply-adds of ``forward_features`` on one image at the tag's size (torch's FLOP counter / 2, scaled
    dot-product attention counted) and the parameters of the model with its classifier."""
    size = recipe_of(tag).image_size
    model = build(tag).eval()
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=SDPA_FLOPS) as counter:
        model.forward_features(torch.zeros(1, 1, size, size))
    return counter.get_total_flops() // 2, sum(p.numel() for p in model.parameters())
