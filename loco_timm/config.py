"""Recipes: typed training and readout configurations, loaded from YAML and overridden from the command line.

A recipe file is YAML (read with ``yaml.safe_load``) with a ``train:`` and an optional ``readout:`` section; the files
in ``hub_configs/`` (:mod:`loco_timm.zoo.tags`) are recipes too, named by their weight tag, and carry further sections
(``model``, ``hub``, ``metrics``, ``card``). Every key is checked: an unknown key or a value of the wrong type or
outside its choices raises :class:`ConfigError` with one line naming the key, the value and what is valid.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

__all__ = ['ConfigError', 'TrainConfig', 'ReadoutConfig', 'apply_overrides', 'from_dict',
           'RECIPE_SECTIONS', 'CHOICES']

RECIPE_SECTIONS = ('train', 'readout', 'model', 'hub', 'metrics', 'card')
CHOICES = {
    'mode': ('loco', 'gim', 'e2e'),
    'decoder': ('conv', 'mlp', None),
    'decoder_norm': ('batch', 'layer', 'none'),
    'sharing': ('full', 'none', 'upper', 'blocks', 'l2'),
    'feature_dtype': ('float32', 'float16'),
    'optimizer': ('lars', 'sgd', 'adamw'),
    'mixed_precision': ('no', 'bf16', 'fp16'),
    'trackers': ('tensorboard', 'none'),
}


class ConfigError(ValueError):
    """A recipe or command-line value is invalid; the message names it and the fix."""


@dataclass
class TrainConfig:
    """Everything a training run depends on. ``lr = base_lr * batch_size / 256``; ``batch_size`` is global."""
    # model
    backbone: str = 'loco_resnet18_small'
    model_args: dict = field(default_factory=dict)
    mode: str = 'loco'
    decoder: typing.Optional[str] = None
    num_stages: typing.Optional[int] = None
    units: typing.Optional[list] = None
    top_unit: bool = False
    temperature: float = 0.1
    proj_dim: int = 128
    decoder_norm: str = 'batch'
    recompute: bool = False  # run a waiting stage's forward again instead of keeping its activations
    decoder_blocks: typing.Optional[int] = None  # conv blocks before pooling (None: the decoder's own, conv 1, mlp 0)
    mlp_layers: int = 2  # linear layers of the projection MLP (the paper's "+ 2-layer MLP": 4)
    sharing: str = 'full'  # LoCo's sharing ablation (loco_timm.core.sharing): full, none, upper, blocks, l2
    sharing_blocks: int = 1  # sharing: blocks: first blocks of the next stage a unit includes
    sharing_l2: float = 1e-3  # sharing: l2: penalty coefficient
    # data
    dataset: str = 'fashion_mnist'
    data_dir: typing.Optional[str] = None
    subset: typing.Optional[int] = None
    image_size: int = 28
    crop_scale: list = field(default_factory=lambda: [0.2, 1.0])
    splits: dict = field(default_factory=dict)  # timm sources: split names of pretrain / train / test
    decode_draft: bool = True  # timm sources: decode JPEGs at the smallest scale no crop upsamples
    decode_device: bool = False  # folders, tars, hfds/: decode JPEGs on the training device (batched on CUDA)
    num_workers: int = 0
    # optimisation
    batch_size: int = 512
    epochs: float = 10
    max_steps: typing.Optional[int] = None
    optimizer: str = 'lars'
    base_lr: float = 0.3
    weight_decay: float = 1e-6
    momentum: float = 0.9
    warmup_epochs: float = 1
    grad_accumulation: int = 1
    # runtime
    seed: int = 0
    mixed_precision: str = 'no'
    channels_last: bool = False
    sync_bn: bool = False
    # stage parallelism (loco_timm.training.stage_parallel): the stages on `pipeline` processes as contiguous groups
    pipeline: typing.Optional[int] = None  # stage groups P (processes = P x replicas); None or 1: off
    placement: typing.Optional[list] = None  # stage indices per group, e.g. [[0, 1], [2, 3]]; None: balanced
    pipelined: bool = False  # LoCo/GIM: don't wait for the one-hop gradient; a group's top stage steps one batch late
    out_dir: str = 'runs/loco'
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    trackers: str = 'tensorboard'

    def __post_init__(self):
        _check(self)
        _check_dataset(self)
        positive = ('batch_size', 'proj_dim', 'image_size', 'checkpoint_every', 'keep_checkpoints', 'log_every')
        for key in positive:
            if getattr(self, key) < 1:
                raise ConfigError(f'{key}={getattr(self, key)!r} must be >= 1')
        if self.epochs <= 0 or self.temperature <= 0 or self.base_lr <= 0:
            raise ConfigError('epochs, temperature and base_lr must be positive')
        if self.grad_accumulation != 1:
            raise ConfigError(
                f'grad_accumulation={self.grad_accumulation} is refused: accumulating gradients over micro-batches '
                f'gives each contrastive loss fewer negatives, so it is not the large-batch objective. Use more '
                f'processes or a smaller batch_size (lr follows batch_size)')
        _check_pipeline(self)
        lo, hi = (self.crop_scale + [None, None])[:2]
        if len(self.crop_scale) != 2 or not 0 < lo <= hi <= 1:
            raise ConfigError(f'crop_scale={self.crop_scale!r} must be [min, max] area fractions with 0 < min <= max <= 1')

    @property
    def lr(self) -> float:
        return self.base_lr * self.batch_size / 256

    @property
    def stage_groups(self) -> int:
        """Number of stage groups P of stage parallelism (1: none)."""
        return len(self.placement) if self.placement is not None else (self.pipeline or 1)


@dataclass
class ReadoutConfig:
    """Linear readout (the paper's protocol, scaled down) and kNN on frozen features, for every stage."""
    epochs: int = 30
    lr: float = 0.1
    lr_grid: typing.Optional[list] = None  # select lr per row and stage on a held-out part of the training split
    val_fraction: float = 0.1
    standardize: bool = True  # train on standardised features (folded back); False: raw features, the paper's lr 30
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 1024
    milestones: list = field(default_factory=lambda: [0.3, 0.6, 0.9])
    knn_k: int = 200
    knn_temperature: float = 0.1
    feature_dtype: str = 'float32'  # how the cached features are held: float16 halves the memory (ImageNet scale)
    references: bool = True
    train_subset: typing.Optional[int] = None
    test_subset: typing.Optional[int] = None
    data_dir: typing.Optional[str] = None
    seed: int = 0

    def __post_init__(self):
        _check(self)
        if self.epochs < 1 or self.batch_size < 1 or self.knn_k < 1 or self.lr <= 0:
            raise ConfigError('readout epochs, batch_size, knn_k and lr must be positive')
        if self.lr_grid is not None and (not self.lr_grid or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in self.lr_grid)):
            raise ConfigError(f'lr_grid={self.lr_grid!r} must be a non-empty list of positive learning rates')
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f'val_fraction={self.val_fraction!r} must be between 0 and 1')


def _type_ok(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, origin or hint)


def _check(cfg: Any) -> None:
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if not _type_ok(value, hints[f.name]):
            raise ConfigError(f'{f.name}={value!r} has the wrong type: expected {_type_name(hints[f.name])}')
        if f.name in CHOICES and value not in CHOICES[f.name]:
            valid = ', '.join(str(c) for c in CHOICES[f.name] if c is not None)
            raise ConfigError(f'{f.name}={value!r} is not valid: choose one of {valid}')


DATASETS = ('fashion_mnist', 'cifar10', 'cifar100', 'stl10', 'imagefolder')


def _check_dataset(cfg: 'TrainConfig') -> None:
    from .data.sources import DEFAULT_SPLITS, is_timm_source
    if cfg.dataset not in DATASETS and not is_timm_source(cfg.dataset):
        raise ConfigError(f'dataset={cfg.dataset!r} is not valid: choose one of {", ".join(DATASETS)} or a timm '
                          f'dataset name (torch/<name>, hfds/<name>, hfids/<name>, wds/<name>, tfds/<name>)')
    unknown = sorted(set(cfg.splits) - set(DEFAULT_SPLITS))
    if unknown or not all(isinstance(v, str) and v for v in cfg.splits.values()):
        raise ConfigError(f'splits={cfg.splits!r} is not valid: map {", ".join(DEFAULT_SPLITS)} to split names, '
                          f'e.g. {{test: val}}')


def _check_pipeline(cfg: 'TrainConfig') -> None:
    if cfg.pipeline is not None and cfg.pipeline < 1:
        raise ConfigError(f'pipeline={cfg.pipeline!r} must be the number of stage groups (>= 1), or null for none')
    if cfg.placement is not None:
        groups = cfg.placement
        if not groups or not all(isinstance(g, list) and g and all(isinstance(k, int) and not isinstance(k, bool)
                                                                   for k in g) for g in groups):
            raise ConfigError(f'placement={groups!r} must be a list of non-empty lists of stage indices, one per '
                              f'stage group, e.g. [[0, 1], [2, 3]]')
        if cfg.pipeline is not None and cfg.pipeline != len(groups):
            raise ConfigError(f'placement has {len(groups)} stage groups but pipeline={cfg.pipeline}: give the '
                              f'same number, or leave pipeline out')
    if cfg.pipelined and cfg.stage_groups < 2:
        raise ConfigError('pipelined: true needs stage parallelism: set pipeline: 2 (or more) or a placement')
    if cfg.stage_groups > 1:
        if cfg.sharing == 'l2':
            raise ConfigError('sharing: l2 keeps a copy of each shared stage on both sides of a cut: it cannot run '
                              'stage-parallel; leave pipeline out')
        if cfg.mixed_precision == 'fp16':
            raise ConfigError('mixed_precision: fp16 (loss scaling) is not supported with stage parallelism: use bf16')
        if cfg.pipelined and cfg.mode == 'e2e':
            raise ConfigError('pipelined: true needs units that cross a cut by one stage (loco, gim): E2E runs '
                              'stage-parallel synchronously only (pipelined: false)')


def _type_name(hint: Any) -> str:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return f'{args[0].__name__} or null' if args else getattr(hint, '__name__', str(hint))


def from_dict(cls: type, values: dict, where: str = '') -> Any:
    """Build ``cls`` from a dict, refusing unknown keys with a list of the valid ones."""
    if not isinstance(values, dict):
        raise ConfigError(f'{where or cls.__name__} must be a mapping of keys to values, got {type(values).__name__}')
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise ConfigError(f'unknown key(s) {", ".join(unknown)} in {where or cls.__name__}: valid keys are '
                          f'{", ".join(valid)}')
    return cls(**_coerce_floats(cls, values))


def _coerce_floats(cls: type, values: dict) -> dict:
    """Float fields accept ints and YAML 1.1's unparsed exponent strings ('1e-6')."""
    hints = typing.get_type_hints(cls)
    out = dict(values)
    for key, value in values.items():
        allowed = typing.get_args(hints[key]) or (hints[key],)
        if float in allowed and not isinstance(value, bool):
            if isinstance(value, int):
                out[key] = float(value)
            elif isinstance(value, str):
                try:
                    out[key] = float(value)
                except ValueError:
                    pass
    return out


def apply_overrides(values: dict, overrides: dict[str, str], cls: type) -> dict:
    """Merge ``--key value`` strings (parsed as YAML scalars/lists) into ``values`` for dataclass ``cls``."""
    valid = {f.name for f in dataclasses.fields(cls)}
    merged = dict(values)
    for key, text in overrides.items():
        if key not in valid:
            raise ConfigError(f'unknown option {key}: valid keys are {", ".join(sorted(valid))}')
        try:
            merged[key] = yaml.safe_load(text) if isinstance(text, str) else text
        except yaml.YAMLError:
            raise ConfigError(f'{key}={text!r} cannot be parsed as a value') from None
    return merged
