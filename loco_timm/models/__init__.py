"""The ``loco_*`` timm models and their weight tags; importing this package registers them with timm.

LoCo: Local Contrastive Representation Learning (Xiong, Ren & Urtasun, NeurIPS 2020, arXiv:2008.01342).

One module per architecture, as timm keeps its own: :mod:`.resnet` (``loco_resnet50``, ``loco_resnet18_small``),
:mod:`.shufflenet_v2` (``loco_shufflenet_v2_50``) and :mod:`.progressive_resnet` (``loco_presnet50``). The weight tags
come from ``hub_configs/`` (:mod:`.tags`), one file per tag; per architecture the LoCo tag comes first, so an
untagged name (``loco_resnet50``) resolves to it. ``timm.list_pretrained('loco_*')`` lists the tags whose weights are
published; every tag can be created, and ``pretrained=True`` downloads through huggingface_hub (``HF_ENDPOINT``
mirrors, offline mode and the cache apply) or, where the weights are missing, raises
:class:`~loco_timm.errors.PretrainedWeightsNotFound` with the tag, the repository and how to produce them.
"""
from __future__ import annotations

from typing import Any

from ..errors import PretrainedWeightsNotFound
from . import progressive_resnet, resnet, shufflenet_v2
from .tags import HubConfig, get_hub_config, list_hub_configs

__all__ = ['ARCHITECTURES', 'HubConfig', 'PretrainedWeightsNotFound', 'get_hub_config', 'list_hub_configs']

# architecture name -> the architecture facts of its pretrained config (a tag's facts come from its hub config)
ARCHITECTURES: dict[str, dict[str, Any]] = {**resnet.RESNETS, **shufflenet_v2.ARCHITECTURES,
                                            **progressive_resnet.ARCHITECTURES}
