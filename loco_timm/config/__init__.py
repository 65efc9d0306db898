"""Recipes: typed training and readout configurations, read from YAML or a weight tag and overridden from the
command line.

* :mod:`.keys`: how a key is declared (section, default, help, choices, resume rule) and checked;
* :mod:`.schema`: :class:`TrainConfig` and :class:`ReadoutConfig`, every key declared once;
* :mod:`.recipe`: :func:`load_recipe`, a YAML file or a weight tag of ``hub_configs/`` as recipe sections.

A recipe file is YAML (read with ``yaml.safe_load``) with a ``train:`` and an optional ``readout:`` section; the files
in ``hub_configs/`` (:mod:`loco_timm.models.tags`) are recipes too, named by their weight tag, and carry further
sections (``model``, ``hub``, ``metrics``, ``card``).
"""
from ..errors import ConfigError
from .keys import Key, apply_overrides, declared_keys, from_dict, to_json
from .recipe import load_recipe
from .schema import TRAIN_SECTIONS, ReadoutConfig, TrainConfig

__all__ = ['ConfigError', 'TrainConfig', 'ReadoutConfig', 'TRAIN_SECTIONS', 'Key', 'declared_keys', 'from_dict',
           'apply_overrides', 'to_json', 'load_recipe', 'resume_keys']


def resume_keys() -> list[str]:
    """The ``train:`` keys a resumed run must share with its checkpoint (declared ``resume=True``)."""
    return [k.name for k in declared_keys(TrainConfig) if k.resume]
