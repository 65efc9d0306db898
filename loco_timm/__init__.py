"""loco-timm: LoCo local contrastive learning (Xiong, Ren & Urtasun, NeurIPS 2020, arXiv:2008.01342) for timm.

``import loco_timm`` registers the ``loco_*`` timm models and their weight tags, and gives:

* the method: :func:`split_stages` cuts any supported timm backbone into sequential stages; :class:`LocalLearner`
  trains them as end-to-end SimCLR, Greedy InfoMax or LoCo units with local decoders and NT-Xent
  (:func:`nt_xent_loss`, :class:`NTXentLoss`, :func:`create_decoder`);
* the entry points: :func:`train` (Accelerate), :func:`readout` (linear and kNN per stage), :func:`export` (a Hugging
  Face Hub repository folder that timm loads) and :func:`publish`, configured by :class:`TrainConfig` and
  :class:`ReadoutConfig` (:func:`load_recipe` reads a recipe file or a weight tag);
* the weight tags of ``hub_configs/``: :func:`list_hub_configs`, :func:`get_hub_config`;
* the errors: :class:`LocoError` and its family (:mod:`loco_timm.errors`), e.g. :class:`ConfigError` and
  :class:`PretrainedWeightsNotFound`.
"""
from . import models  # noqa: F401  (registers the loco_* timm models)
from ._version import __version__
from .config import ReadoutConfig, TrainConfig, load_recipe
from .core.decoders import LocalDecoder, ProjectionMLP, create_decoder
from .core.learner import MODES, LocalLearner, make_units
from .core.losses import NTXentLoss, nt_xent_loss
from .core.stages import register_stage_adapter, split_stages, supported_families
from .errors import ConfigError, LocoError, PretrainedWeightsNotFound
from .evaluation.readout import readout
from .hub.export import export
from .hub.publish import publish
from .models.tags import get_hub_config, list_hub_configs
from .training.train import train

__all__ = [
    '__version__',
    # the method
    'LocalLearner', 'split_stages', 'make_units', 'MODES', 'create_decoder', 'LocalDecoder', 'ProjectionMLP',
    'nt_xent_loss', 'NTXentLoss', 'register_stage_adapter', 'supported_families',
    # configuration and entry points
    'TrainConfig', 'ReadoutConfig', 'load_recipe', 'train', 'readout', 'export', 'publish',
    # weight tags
    'list_hub_configs', 'get_hub_config',
    # errors
    'LocoError', 'ConfigError', 'PretrainedWeightsNotFound',
]
