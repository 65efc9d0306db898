"""Reading a recipe: a YAML file with ``train:`` and ``readout:`` sections, or a weight tag / hub config file from
``hub_configs/`` (:mod:`loco_timm.models.tags`), whose other sections fill in the model."""
from __future__ import annotations

from pathlib import Path

import yaml

from ..errors import ConfigError
from ..models.tags import SECTIONS as RECIPE_SECTIONS
from ..models.tags import get_hub_config, load_hub_config

__all__ = ['load_recipe']


def load_recipe(path: str | Path) -> dict:
    """Read a recipe into its sections, checking the section names.

    Args:
        path: a YAML file, or a weight tag (``loco_resnet18_small.simclr_fmnist``) naming a file in ``hub_configs/``.
            A hub config (a file with a ``hub:`` section) fills in ``backbone``, ``model_args`` and ``image_size``.
    """
    text = str(path)
    if not text.endswith(('.yaml', '.yml')) and '/' not in text and not Path(text).exists():
        return get_hub_config(text).recipe()
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f'recipe {path} does not exist: give a YAML file (see hub_configs/ for examples)')
    try:
        recipe = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f'recipe {path} is not valid YAML: {str(err).splitlines()[0]}') from None
    if not isinstance(recipe, dict):
        raise ConfigError(f'recipe {path} must be a mapping with sections {", ".join(RECIPE_SECTIONS)}')
    unknown = sorted(set(recipe) - set(RECIPE_SECTIONS))
    if unknown:
        raise ConfigError(f'unknown section(s) {", ".join(unknown)} in {path}: valid sections are '
                          f'{", ".join(RECIPE_SECTIONS)}')
    if 'hub' in recipe:
        return load_hub_config(path).recipe()
    return recipe
