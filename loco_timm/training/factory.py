"""Build the LocalLearner a recipe describes: the one place training, readout and export make it."""
from __future__ import annotations

import timm
import torch
from timm.data import resolve_model_data_config

from ..config import TrainConfig
from ..core.learner import LocalLearner
from ..errors import ConfigError

__all__ = ['build_learner', 'fixed_input_size']


def fixed_input_size(backbone: torch.nn.Module, size: tuple[int, int], in_chans: int) -> tuple[int, int] | None:
    """None when the model takes ``size`` images, else the (H, W) it needs: a model timm marks as having a fixed
    input size is tried once at ``size`` (as built: an ``img_size`` model argument may have changed it)."""
    if not (getattr(backbone, 'pretrained_cfg', None) or {}).get('fixed_input_size', False):
        return None
    flags = {m: m.training for m in backbone.modules()}
    backbone.eval()
    try:
        with torch.no_grad():
            backbone.forward_features(torch.zeros(1, in_chans, *size))
        return None
    except Exception:  # noqa: BLE001 - any failure at this size means the model needs its own
        built = getattr(getattr(backbone, 'patch_embed', None), 'img_size', None) or getattr(backbone, 'img_size', None)
        if built is not None:
            return tuple(built) if isinstance(built, (tuple, list)) else (built, built)
        return tuple(resolve_model_data_config(backbone)['input_size'][1:])
    finally:
        for m, flag in flags.items():
            m.training = flag


def build_learner(cfg: TrainConfig, in_chans: int, num_classes: int) -> LocalLearner:
    """The timm backbone of the recipe wrapped as a LocalLearner (no weights loaded)."""
    if not timm.is_model(cfg.backbone):
        raise ConfigError(f'unknown backbone {cfg.backbone!r}: use a timm model name (timm.list_models()) or '
                          f'loco_resnet18_small')
    try:
        backbone = timm.create_model(cfg.backbone, pretrained=False, in_chans=in_chans, num_classes=num_classes,
                                     **cfg.model_args)
    except TypeError as err:
        raise ConfigError(f'model_args {cfg.model_args} do not fit {cfg.backbone}: {err}') from None
    if cfg.sync_bn:
        backbone = torch.nn.SyncBatchNorm.convert_sync_batchnorm(backbone)
    needed = fixed_input_size(backbone, (cfg.image_size, cfg.image_size), in_chans)
    if needed is not None:
        raise ConfigError(f'{cfg.backbone} takes {needed[0]}x{needed[1]} px images only (a fixed input size), not '
                          f'image_size {cfg.image_size}: set image_size: {needed[0]}, or model_args img_size: '
                          f'{cfg.image_size} where the model accepts it')
    settings = {k: v for k, v in cfg.section('learner').items() if k not in ('backbone', 'model_args')}
    try:  # the learner section's keys are LocalLearner's arguments
        learner = LocalLearner(backbone, input_size=(in_chans, cfg.image_size, cfg.image_size), **settings)
    except ValueError as err:
        raise ConfigError(f'backbone {cfg.backbone}: {err}') from None
    if cfg.sync_bn:
        learner.decoders = torch.nn.SyncBatchNorm.convert_sync_batchnorm(learner.decoders)
    return learner
