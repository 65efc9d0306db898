"""loco-timm: LoCo local contrastive learning (Xiong, Ren & Urtasun, NeurIPS 2020, arXiv:2008.01342) for timm.

``import loco_timm`` gives:

* :func:`split_stages` - cut any supported timm backbone into sequential stages;
* :class:`LocalLearner` - end-to-end SimCLR, Greedy InfoMax and LoCo units with local decoders and NT-Xent;
* :func:`nt_xent_loss` / :class:`NTXentLoss` and :func:`create_decoder` - the building blocks.
"""
from .decoders import create_decoder, LocalDecoder, ProjectionMLP
from .learner import LocalLearner, make_units, MODES
from .losses import nt_xent_loss, NTXentLoss
from .stages import register_stage_adapter, split_stages, supported_families
from . import zoo  # noqa: F401  (registers the loco_* timm models)

__version__ = '0.1.0'
