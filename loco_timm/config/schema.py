"""The recipe's keys: :class:`TrainConfig` (a recipe's ``train:`` section) and :class:`ReadoutConfig` (its
``readout:`` section), every key declared once with its section, default, help, choices and resume rule
(:mod:`loco_timm.config.keys`).

The ``train:`` keys are grouped into sections (:data:`TRAIN_SECTIONS`): ``learner`` (the method, passed to
:class:`~loco_timm.LocalLearner`), ``data``, ``optimisation``, ``runtime``, ``parallelism`` and ``checkpointing``.
In YAML the section stays flat (``train: {mode: loco, batch_size: 512}``), as recipes have always been written.
Every key is checked: an unknown key, or a value of the wrong type or outside its choices, raises
:class:`~loco_timm.errors.ConfigError` with one line naming the key, the value and what is valid.
"""
from __future__ import annotations

import typing
from dataclasses import dataclass

from ..core.decoders import DECODERS, NORMS
from ..core.sharing import SHARING
from ..core.units import MODES
from ..data.datasets import DATASETS
from ..data.sources import DEFAULT_SPLITS, is_timm_source
from ..errors import ConfigError
from .keys import check_values, declared_keys, section_key

__all__ = ['TrainConfig', 'ReadoutConfig', 'TRAIN_SECTIONS', 'OPTIMIZERS', 'PRECISIONS', 'TRACKERS']

TRAIN_SECTIONS = {
    'learner': 'the method: backbone, units, decoders and loss (passed to LocalLearner)',
    'data': 'what the run reads and how views are cut',
    'optimisation': 'optimiser, learning-rate schedule, batch and budget',
    'runtime': 'numerics and memory layout on the device',
    'parallelism': 'stage parallelism across processes (data parallelism comes from `accelerate launch`)',
    'checkpointing': 'where and how often the run writes checkpoints and logs',
}
OPTIMIZERS = ('lars', 'sgd', 'adamw')
PRECISIONS = ('no', 'bf16', 'fp16')
TRACKERS = ('tensorboard', 'none')

learner = section_key('learner')
data = section_key('data')
optimisation = section_key('optimisation')
runtime = section_key('runtime')
parallelism = section_key('parallelism')
checkpointing = section_key('checkpointing')
readout = section_key('readout')
Optional = typing.Optional


@dataclass
class TrainConfig:
    """Everything a training run depends on. ``lr = base_lr * batch_size / 256``; ``batch_size`` is global."""
    backbone: str = learner('loco_resnet18_small', resume=True,
                            help='timm model name (timm.list_models(), or a loco_* model)')
    model_args: dict = learner(factory=dict, resume=True, help='keyword arguments of the timm model constructor')
    mode: str = learner('loco', resume=True, choices=MODES,
                        help='e2e: end-to-end SimCLR, gim: Greedy InfoMax, loco: overlapping local units')
    decoder: Optional[str] = learner(None, resume=True, choices=DECODERS + (None,),
                                     help='local decoder; null: conv for gim/loco, mlp for e2e')
    num_stages: Optional[int] = learner(None, resume=True, help="number of stages K; null: the model's levels")
    units: Optional[list] = learner(None, resume=True,
                                    help="custom units as [first, last] stage pairs (overrides mode's units)")
    top_unit: bool = learner(False, resume=True, help='LoCo: add a unit on the last stage alone')
    temperature: float = learner(0.1, resume=True, help='NT-Xent temperature')
    proj_dim: int = learner(128, resume=True, help='embedding width of every decoder')
    decoder_norm: str = learner('batch', resume=True, choices=NORMS, help='normalisation inside the decoders')
    recompute: bool = learner(False, resume=False,
                              help="run a waiting stage's forward again instead of keeping its activations "
                                   "(same gradients)")
    decoder_blocks: Optional[int] = learner(None, resume=True,
                                            help="conv blocks before pooling; null: the decoder's own (conv 1, mlp 0)")
    mlp_layers: int = learner(2, resume=True, help='linear layers of the projection MLP (the paper\'s "+ 2-layer '
                                                   'MLP": 4)')
    sharing: str = learner('full', resume=True, choices=SHARING,
                           help="LoCo's sharing ablation (loco_timm.core.sharing)")
    sharing_blocks: int = learner(1, resume=True, help='sharing: blocks: first blocks of the next stage a unit takes')
    sharing_l2: float = learner(1e-3, resume=True, help='sharing: l2: penalty coefficient')

    dataset: str = data('fashion_mnist', resume=True,
                        help=f'{", ".join(DATASETS)}, or a timm dataset name (torch/, hfds/, hfids/, wds/, tfds/)')
    data_dir: Optional[str] = data(None, resume=False, help='where the dataset is (a timm source: its root)')
    subset: Optional[int] = data(None, resume=True, help='keep the first N images')
    image_size: int = data(28, resume=True, help='side of the square views, in pixels')
    crop_scale: list = data(factory=lambda: [0.2, 1.0], resume=True,
                            help='[min, max] area fraction of the random resized crop')
    splits: dict = data(factory=dict, resume=True, help='timm sources: split names of pretrain / train / test')
    decode_draft: bool = data(True, resume=True, help='timm sources: decode JPEGs at the smallest scale no crop '
                                                      'upsamples')
    decode_device: bool = data(False, resume=True, help='folders, tars, hfds/: decode JPEGs on the training device')
    num_workers: int = data(0, resume=False, help='DataLoader worker processes (the run does not depend on it)')

    batch_size: int = optimisation(512, resume=True, help='global batch (split over processes)')
    epochs: float = optimisation(10, resume=True, help='training budget in epochs')
    max_steps: Optional[int] = optimisation(None, resume=True, help='stop after this many steps instead')
    optimizer: str = optimisation('lars', resume=True, choices=OPTIMIZERS, help='timm.optim optimiser')
    base_lr: float = optimisation(0.3, resume=True, help='learning rate per 256 images: lr = base_lr x batch_size '
                                                         '/ 256')
    weight_decay: float = optimisation(1e-6, resume=True, help='weight decay (not on biases and norms)')
    momentum: float = optimisation(0.9, resume=True, help='momentum of lars and sgd')
    warmup_epochs: float = optimisation(1, resume=True, help='linear warm-up, then cosine decay, per step')
    grad_accumulation: int = optimisation(1, resume=True, help='must be 1: micro-batches would change the '
                                                               'contrastive objective')
    seed: int = optimisation(0, resume=True, help='seeds the weights, the views and the data order')

    mixed_precision: str = runtime('no', resume=True, choices=PRECISIONS,
                                   help="Accelerate's autocast inside the learner's step")
    channels_last: bool = runtime(False, resume=False, help='channels-last memory layout (speed only)')
    sync_bn: bool = runtime(False, resume=True, help='BatchNorm statistics over all processes (CUDA only)')

    pipeline: Optional[int] = parallelism(None, resume=False,
                                          help='stage groups P (processes = P x replicas); null or 1: off')
    placement: Optional[list] = parallelism(None, resume=False,
                                            help='stage indices per group, e.g. [[0, 1], [2, 3]]; null: balanced '
                                                 '(a pipelined run resumes on its own)')
    pipelined: bool = parallelism(False, resume=True, help="LoCo/GIM: don't wait for the one-hop gradient; a "
                                                           "group's top stage steps one batch late")

    out_dir: str = checkpointing('runs/loco', resume=False, help='the run folder (checkpoints, logs, summary)')
    checkpoint_every: int = checkpointing(500, resume=False, help='steps between checkpoints')
    keep_checkpoints: int = checkpointing(2, resume=False, help='intact checkpoints kept')
    log_every: int = checkpointing(10, resume=False, help='steps between logged losses')
    trackers: str = checkpointing('tensorboard', resume=False, choices=TRACKERS,
                                  help='Accelerate tracker (tensorboard where installed)')

    def __post_init__(self):
        check_values(self)
        _check_dataset(self)
        positive = ('batch_size', 'proj_dim', 'image_size', 'checkpoint_every', 'keep_checkpoints', 'log_every')
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f'{name}={getattr(self, name)!r} must be >= 1')
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
            raise ConfigError(f'crop_scale={self.crop_scale!r} must be [min, max] area fractions with '
                              f'0 < min <= max <= 1')

    @property
    def lr(self) -> float:
        return self.base_lr * self.batch_size / 256

    @property
    def stage_groups(self) -> int:
        """Number of stage groups P of stage parallelism (1: none)."""
        return len(self.placement) if self.placement is not None else (self.pipeline or 1)

    def section(self, name: str) -> dict:
        """The keys of one section (:data:`TRAIN_SECTIONS`) with their values."""
        return {k.name: getattr(self, k.name) for k in declared_keys(TrainConfig) if k.section == name}


@dataclass
class ReadoutConfig:
    """Linear readout (the paper's protocol, scaled down) and kNN on frozen features, for every stage."""
    epochs: int = readout(30, resume=False, help='epochs of the linear classifier')
    lr: float = readout(0.1, resume=False, help='its SGD learning rate')
    lr_grid: Optional[list] = readout(None, resume=False, help='choose lr per row and stage from these on a '
                                                               'held-out part of the training split')
    val_fraction: float = readout(0.1, resume=False, help='the held-out part for lr_grid')
    standardize: bool = readout(True, resume=False, help='train on standardised features (folded back); false: raw '
                                                         'features, the paper\'s lr 30')
    momentum: float = readout(0.9, resume=False, help='SGD momentum')
    weight_decay: float = readout(0.0, resume=False, help='SGD weight decay')
    batch_size: int = readout(1024, resume=False, help='batch of the linear classifier and of feature extraction')
    milestones: list = readout(factory=lambda: [0.3, 0.6, 0.9], resume=False,
                               help='lr / 10 at these fractions of the epochs')
    knn_k: int = readout(200, resume=False, help='neighbours of the kNN classifier')
    knn_temperature: float = readout(0.1, resume=False, help='temperature of its weighted votes')
    feature_dtype: str = readout('float32', resume=False, choices=('float32', 'float16'),
                                 help='how cached features are held: float16 halves the memory (ImageNet scale)')
    references: bool = readout(True, resume=False, help='also read out raw pixels and the random-init encoder')
    train_subset: Optional[int] = readout(None, resume=False, help='first N training images only')
    test_subset: Optional[int] = readout(None, resume=False, help='first N test images only')
    data_dir: Optional[str] = readout(None, resume=False, help="where the dataset is (default: the training run's)")
    seed: int = readout(0, resume=False, help='seeds the classifier and the lr_grid split')

    def __post_init__(self):
        check_values(self)
        if self.epochs < 1 or self.batch_size < 1 or self.knn_k < 1 or self.lr <= 0:
            raise ConfigError('readout epochs, batch_size, knn_k and lr must be positive')
        if self.lr_grid is not None and (not self.lr_grid or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in self.lr_grid)):
            raise ConfigError(f'lr_grid={self.lr_grid!r} must be a non-empty list of positive learning rates')
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f'val_fraction={self.val_fraction!r} must be between 0 and 1')


def _check_dataset(cfg: TrainConfig) -> None:
    if cfg.dataset not in DATASETS and not is_timm_source(cfg.dataset):
        raise ConfigError(f'dataset={cfg.dataset!r} is not valid: choose one of {", ".join(DATASETS)} or a timm '
                          f'dataset name (torch/<name>, hfds/<name>, hfids/<name>, wds/<name>, tfds/<name>)')
    unknown = sorted(set(cfg.splits) - set(DEFAULT_SPLITS))
    if unknown or not all(isinstance(v, str) and v for v in cfg.splits.values()):
        raise ConfigError(f'splits={cfg.splits!r} is not valid: map {", ".join(DEFAULT_SPLITS)} to split names, '
                          f'e.g. {{test: val}}')


def _check_pipeline(cfg: TrainConfig) -> None:
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
