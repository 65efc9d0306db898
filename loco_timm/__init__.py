"""loco-timm: LoCo local contrastive learning (Xiong, Ren & Urtasun, NeurIPS 2020, arXiv:2008.01342) for timm.

``import loco_timm`` gives:

* :func:`split_stages` - cut any supported timm backbone into sequential stages;
* :class:`LocalLearner` - end-to-end SimCLR, Greedy InfoMax and LoCo units with local decoders and NT-Xent;
* :func:`nt_xent_loss` / :class:`NTXentLoss` and :func:`create_decoder` - the building blocks;
* the timm models ``loco_resnet50`` and ``loco_resnet18_small`` with the weight tags of ``hub_configs/``
  (:mod:`loco_timm.zoo`, :mod:`loco_timm.zoo.tags`), :func:`loco_timm.zoo.export.export` and :func:`loco_timm.zoo.hub.publish`
  of trained checkpoints as Hugging Face Hub repositories, and :class:`PretrainedWeightsNotFound` for tags whose
  weights are not on the Hub.
"""
from .core.decoders import create_decoder, LocalDecoder, ProjectionMLP
from .core.learner import LocalLearner, make_units, MODES
from .core.losses import nt_xent_loss, NTXentLoss
from .core.stages import register_stage_adapter, split_stages, supported_families
from . import zoo  # noqa: F401  (registers the loco_* timm models)
from .zoo import PretrainedWeightsNotFound
from .zoo.tags import get_hub_config, list_hub_configs

__version__ = '0.1.0'
