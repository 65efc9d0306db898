"""Weight tags: the files in ``hub_configs/``, one per published (or publishable) weight tag.

A hub config is named ``<architecture>.<tag>.yaml`` (timm's ``arch.tag``) and is the single source of truth for its
tag: the timm registry (:mod:`loco_timm.models`), the training and readout recipe (``loco-timm train --config TAG``),
the exported repository's ``config.json`` and model card (:mod:`loco_timm.hub.export`) and the zoo's ``MODEL_CARD.md``
(:mod:`tools/cards.py`) all read it. Its sections:

* ``model:`` ``model_args`` (JSON-serialisable timm arguments), ``timm_architecture`` (the plain timm name that builds
  the same module, if any: then the exported repository loads without loco_timm), the pretrained config (``input_size``,
  ``mean``, ``std``, ``crop_pct``, ``interpolation``, ``num_classes``, optional ``label_names``);
* ``hub:`` ``hf_hub_id`` (optionally ``@revision``), ``published``, ``license``, ``paper``, ``dataset`` (HF id);
* ``train:`` / ``readout:`` the recipe (``backbone``, ``model_args`` and ``image_size`` come from the name and
  ``model:``, not repeated);
* ``metrics:`` measured results and how they were measured (``source``, ``command``, ``date``);
* ``card:`` the model card's prose (``summary``, ``limitations``).

The files live in ``hub_configs/`` at the top of the repository and are installed with the package
(``loco_timm/hub_configs`` in a wheel).
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub.utils import HFValidationError, validate_repo_id

from ..errors import ConfigError

__all__ = ['SECTIONS', 'HubConfig', 'hub_config_dir', 'list_hub_configs', 'get_hub_config', 'load_hub_config',
           'reload_hub_configs', 'MODE_ORDER']

# the sections of a hub config; a plain recipe has the first two
SECTIONS = ('train', 'readout', 'model', 'hub', 'metrics', 'card')
MODE_ORDER = ('loco', 'e2e', 'gim')  # order of tags per architecture: the first is what an untagged name loads
_MODEL_KEYS = ('model_args', 'timm_architecture', 'input_size', 'mean', 'std', 'crop_pct', 'interpolation',
               'num_classes', 'label_names')
_HUB_KEYS = ('hf_hub_id', 'published', 'license', 'paper', 'dataset')
_DERIVED_TRAIN_KEYS = ('backbone', 'model_args', 'image_size')
_NAME = re.compile(r'^(?P<arch>[a-z0-9_]+)\.(?P<tag>[a-z0-9_]+)$')


def hub_config_dir() -> Path:
    """The folder of hub configs: installed with the package, or ``hub_configs/`` of a source checkout."""
    package = Path(__file__).resolve().parents[1]
    for candidate in (package / 'hub_configs', package.parent / 'hub_configs'):
        if candidate.is_dir() and any(candidate.glob('*.yaml')):
            return candidate
    raise FileNotFoundError(f'no hub_configs folder next to {package}: reinstall loco-timm')


@dataclass
class HubConfig:
    """One weight tag, read from ``hub_configs/<architecture>.<tag>.yaml``."""
    architecture: str
    tag: str
    path: Path
    model: dict
    hub: dict
    train: dict
    readout: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    card: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        """``architecture.tag``, as timm names pretrained weights."""
        return f'{self.architecture}.{self.tag}'

    @property
    def mode(self) -> str:
        return self.train.get('mode', 'loco')

    @property
    def model_args(self) -> dict:
        return dict(self.model.get('model_args') or {})

    @property
    def hf_hub_id(self) -> str:
        return self.hub['hf_hub_id']

    @property
    def repo_id(self) -> str:
        """``hf_hub_id`` without its ``@revision``."""
        return self.hf_hub_id.split('@')[0]

    @property
    def revision(self) -> str | None:
        return self.hf_hub_id.split('@')[1] if '@' in self.hf_hub_id else None

    @property
    def published(self) -> bool:
        return bool(self.hub.get('published', False))

    @property
    def export_architecture(self) -> str:
        """The architecture an exported ``config.json`` names: plain timm's when it has the module."""
        return self.model.get('timm_architecture') or self.architecture

    @property
    def linear_top1(self) -> float | None:
        """The measured last-stage linear readout top-1 (%), None where not measured."""
        value = self.metrics.get('linear_top1')
        return value[-1] if isinstance(value, (list, tuple)) else value

    @property
    def measured_by(self) -> str:
        """Who measured :attr:`linear_top1`: the paper, loco-timm (with the command), or nobody yet."""
        source = self.metrics.get('source')
        if not source:
            return 'not measured yet'
        return 'the paper' if 'paper' in source else f'loco-timm (`{self.metrics.get("command", "")}`)'

    def pretrained_cfg(self) -> dict[str, Any]:
        """The tag's part of timm's pretrained config (the architecture adds ``first_conv``, ``classifier`` ...). Only a
        published tag names its ``hf_hub_id`` there, so ``timm.list_pretrained`` lists exactly the published tags."""
        cfg = dict(num_classes=self.model['num_classes'],
                   input_size=tuple(self.model['input_size']), mean=tuple(self.model['mean']),
                   std=tuple(self.model['std']), crop_pct=self.model.get('crop_pct', 1.0),
                   interpolation=self.model.get('interpolation', 'bilinear'),
                   license=self.hub.get('license', 'apache-2.0'), paper_ids=self.hub.get('paper'),
                   notes=(f'{self.mode.upper()} pre-training on {self.train.get("dataset")}' +
                          ('' if self.published else '; weights not published yet'),))
        if self.model.get('label_names'):
            cfg['label_names'] = tuple(self.model['label_names'])
        if self.published:
            cfg['hf_hub_id'] = self.hf_hub_id
        return cfg

    def recipe(self) -> dict[str, Any]:
        """The training recipe's sections, with the keys a hub config does not repeat filled in."""
        train = dict(self.train, backbone=self.architecture, model_args=self.model_args,
                     image_size=int(self.model['input_size'][-1]))
        return dict(train=train, readout=dict(self.readout))


def _check_keys(section: dict, valid: tuple, where: str) -> None:
    unknown = sorted(set(section) - set(valid))
    if unknown:
        raise ConfigError(f'unknown key(s) {", ".join(unknown)} in {where}: valid keys are {", ".join(valid)}')


def load_hub_config(path: str | Path) -> HubConfig:
    """Read and check one hub config file (``<architecture>.<tag>.yaml``)."""
    path = Path(path)
    match = _NAME.match(path.name[:-len('.yaml')] if path.name.endswith('.yaml') else '')
    if not match:
        raise ConfigError(f'hub config {path.name} must be named <architecture>.<tag>.yaml in lower case')
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f'hub config {path} is not valid YAML: {str(err).splitlines()[0]}') from None
    if not isinstance(raw, dict) or not isinstance(raw.get('model'), dict) or not isinstance(raw.get('hub'), dict):
        raise ConfigError(f'hub config {path} needs model: and hub: sections (see hub_configs/ for examples)')
    _check_keys(raw, SECTIONS, f'{path} (sections)')
    _check_keys(raw['model'], _MODEL_KEYS, f'model: of {path}')
    _check_keys(raw['hub'], _HUB_KEYS, f'hub: of {path}')
    for key in ('input_size', 'mean', 'std', 'num_classes'):
        if key not in raw['model']:
            raise ConfigError(f'model: of {path} lacks {key}')
    if 'hf_hub_id' not in raw['hub']:
        raise ConfigError(f'hub: of {path} lacks hf_hub_id (ORG/NAME, optionally @revision)')
    try:
        validate_repo_id(str(raw['hub']['hf_hub_id']).split('@')[0])
    except HFValidationError as err:
        raise ConfigError(f'hub: hf_hub_id of {path} is not a valid repo id: {err}') from None
    train = raw.get('train') or {}
    repeated = sorted(set(train) & set(_DERIVED_TRAIN_KEYS))
    if repeated:
        raise ConfigError(f'train: of {path} sets {", ".join(repeated)}: a hub config takes them from its file name '
                          f'and model: section; remove them')
    cfg = HubConfig(match['arch'], match['tag'], path, raw['model'], raw['hub'], train, raw.get('readout') or {},
                    raw.get('metrics') or {}, raw.get('card') or {})
    if cfg.mode not in MODE_ORDER:
        raise ConfigError(f'train: mode of {path} is {cfg.mode!r}: use one of {", ".join(MODE_ORDER)}')
    return cfg


@cache
def _load_all(folder: str) -> tuple[HubConfig, ...]:
    configs = [load_hub_config(p) for p in sorted(Path(folder).glob('*.yaml'))]
    return tuple(sorted(configs, key=lambda c: (c.architecture, MODE_ORDER.index(c.mode), c.tag)))


def reload_hub_configs() -> None:
    """Forget the hub configs read so far (after a tool rewrote one)."""
    _load_all.cache_clear()


def list_hub_configs(folder: str | Path | None = None) -> list[HubConfig]:
    """Every hub config, ordered by architecture and mode (LoCo first, the tag an untagged name resolves to)."""
    return [copy.deepcopy(c) for c in _load_all(str(folder or hub_config_dir()))]


def get_hub_config(name_or_path: str | Path) -> HubConfig:
    """A hub config by ``architecture.tag`` (see ``list_hub_configs``) or by the path of a YAML file."""
    text = str(name_or_path)
    if text.endswith('.yaml') or '/' in text:
        if not Path(text).is_file():
            raise ConfigError(f'hub config {text} does not exist')
        return load_hub_config(text)
    configs = {c.name: c for c in list_hub_configs()}
    if text not in configs:
        raise ConfigError(f'unknown weight tag {text!r}: valid tags are {", ".join(configs)}')
    return configs[text]
