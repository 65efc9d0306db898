"""Export a trained checkpoint as a Hugging Face Hub repository that timm loads: ``loco-timm export``.

The folder holds ``model.safetensors`` (the timm architecture's state dict: encoder + the linear readout head as its
classifier; never a pickled ``.bin``), timm's ``config.json`` (naming plain timm's architecture where timm has it, so
``timm.create_model('hf-hub:ORG/NAME', pretrained=True)`` works without loco_timm), a ``README.md`` model card, the full
learner state (encoder + local decoders) as ``learner.safetensors``, the tag's hub config (``<arch>.<tag>.yaml``) and
the readout's ``readout.json`` / ``readout.png``. It is written to a temporary folder and renamed into place.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import load_file, save_file
from timm.models._hub import save_config_for_hf

from ..config import TrainConfig, from_dict
from ..errors import ConfigError, DamagedFileError, MissingFileError, OutputExistsError
from ..files import plain_permissions
from ..models import ARCHITECTURES
from ..models.tags import HubConfig, get_hub_config
from ..training.checkpoint import read_progress, resolve_checkpoint
from .card import model_card

__all__ = ['export', 'build_export_model', 'save_timm_model', 'EXPORT_FILES']

# and the hub config, as <architecture>.<tag>.yaml
EXPORT_FILES = ('model.safetensors', 'config.json', 'README.md', 'learner.safetensors', 'readout.json', 'readout.png')


def _mismatch(own: dict, state: dict) -> str:
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    parts = [f'{label}: {", ".join(keys[:3])}{" ..." if len(keys) > 3 else ""}'
             for label, keys in (('missing', missing), ('unexpected', unexpected), ('wrong shape', wrong)) if keys]
    return '; '.join(parts)


def _tag_cfg(model: torch.nn.Module, hub: HubConfig) -> dict[str, Any]:
    """timm's pretrained config of the architecture with the tag's part in it, without what describes the
    architecture's own training inputs: ``test_input_size`` / ``test_crop_pct`` (convnext_atto's 288 px would reach
    ``resolve_data_config(use_test_size=True)``) and ``pool_size`` (the final map at the tag's input size instead)."""
    cfg = {k: v for k, v in model.pretrained_cfg.items() if k not in ('test_input_size', 'test_crop_pct')}
    cfg.update(hub.pretrained_cfg(), tag=hub.tag)
    info = getattr(model, 'feature_info', None)
    if cfg.get('pool_size') and info:
        cfg['pool_size'] = tuple(math.ceil(side / info[-1]['reduction']) for side in cfg['input_size'][-2:])
    return cfg


def build_export_model(hub: HubConfig, encoder_state: dict[str, torch.Tensor],
                       head_state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The tag's timm model (``architecture.tag``, its pretrained config) holding the encoder and readout head."""
    kwargs = dict(dict(num_classes=hub.model['num_classes'], in_chans=hub.model['input_size'][0]), **hub.model_args)
    if hub.architecture in ARCHITECTURES:  # a registered tag: its pretrained config comes with it
        model = timm.create_model(hub.name, pretrained=False, **kwargs)
    else:  # any other timm architecture: the hub config supplies the tag's part of the pretrained config
        model = timm.create_model(hub.architecture, pretrained=False, **kwargs)
        model.pretrained_cfg = model.default_cfg = _tag_cfg(model, hub)
    state = dict(encoder_state)
    classifier = model.pretrained_cfg.get('classifier', 'fc')
    for key, value in head_state.items():
        state[key if key.startswith(classifier + '.') else f'{classifier}.{key}'] = value
    problems = _mismatch(model.state_dict(), state)
    if problems:
        raise ConfigError(f'the checkpoint does not fit {hub.name} ({problems}): export it with the tag it was '
                         f'trained with')
    model.load_state_dict(state)
    return model.eval()


def save_timm_model(model: torch.nn.Module, hub: HubConfig, folder: str | Path) -> None:
    """Write ``model.safetensors`` and timm's ``config.json`` (naming plain timm's architecture where it has one)."""
    folder = Path(folder)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / 'model.safetensors'),
              metadata={'format': 'pt'})
    model_config: dict[str, Any] = dict(label_names=list(hub.model['label_names'])) \
        if hub.model.get('label_names') else {}
    model_args = dict(hub.model_args, **({'in_chans': hub.model['input_size'][0]}
                                         if hub.model['input_size'][0] != 3 else {}))
    save_config_for_hf(model, folder / 'config.json', model_config=model_config, model_args=model_args or None)
    config_json = json.loads((folder / 'config.json').read_text())
    config_json['architecture'] = hub.export_architecture
    for key in ('hf_hub_id', 'notes'):  # the repository is the source now; notes describe the registry entry
        config_json['pretrained_cfg'].pop(key, None)
    config_json['pretrained_cfg']['tag'] = hub.tag
    config_json['pretrained_cfg']['architecture'] = hub.export_architecture
    (folder / 'config.json').write_text(json.dumps(config_json, indent=2) + '\n')


def _check_recipe(hub: HubConfig, cfg: TrainConfig, progress: dict, checkpoint: Path) -> None:
    expected = hub.recipe()['train']
    differs = [f'{key} {getattr(cfg, key)!r} != {expected[key]!r}' for key in ('backbone', 'model_args', 'image_size')
               if getattr(cfg, key) != expected[key]]
    if progress.get('num_classes') != hub.model['num_classes']:
        differs.append(f'num_classes {progress.get("num_classes")} != {hub.model["num_classes"]}')
    if progress.get('in_chans') != hub.model['input_size'][0]:
        differs.append(f'in_chans {progress.get("in_chans")} != {hub.model["input_size"][0]}')
    if differs:
        raise ConfigError(f'{checkpoint} was not trained as {hub.name}: {"; ".join(differs)}. Export it with a hub '
                          f'config that matches its recipe')


def export(checkpoint: str | Path, config: str | Path, out: str | Path, *, readout_dir: str | Path | None = None,
           log=print) -> Path:
    """Write the Hub repository folder of a checkpoint and its readout.

    Args:
        checkpoint: a run folder (its latest checkpoint) or a checkpoint folder.
        config: the weight tag (``loco_resnet18_small.simclr_fmnist``) or the path of a hub config YAML file.
        out: the folder to write; an existing non-empty folder is refused.
        readout_dir: where ``loco-timm readout`` wrote ``readout.json`` and ``readout_head.safetensors``
            (default: the run folder).

    Returns:
        The written folder.
    """
    hub = get_hub_config(config)
    checkpoint = resolve_checkpoint(checkpoint)
    progress = read_progress(checkpoint)
    cfg = from_dict(TrainConfig, progress['config'], where=f'{checkpoint}/progress.json')
    _check_recipe(hub, cfg, progress, checkpoint)
    readout_dir = Path(readout_dir or checkpoint.parent.parent)
    results_path, head_path = readout_dir / 'readout.json', readout_dir / 'readout_head.safetensors'
    if not results_path.is_file() or not head_path.is_file():
        raise MissingFileError(f'no readout of {checkpoint} in {readout_dir}: run `loco-timm readout {checkpoint}` '
                                f'first (the exported classifier is its linear head)')
    try:
        results = json.loads(results_path.read_text())
        head = load_file(str(head_path))
    except Exception as err:  # noqa: BLE001 - a damaged readout file: say which and how to redo it
        raise DamagedFileError(f'{results_path.name} or {head_path.name} in {readout_dir} is damaged '
                         f'({type(err).__name__}): run `loco-timm readout {checkpoint}` again') from None
    if Path(results.get('checkpoint', '')).resolve() != checkpoint.resolve():
        raise ConfigError(f'{results_path} evaluates {results.get("checkpoint")}, not {checkpoint}: run '
                         f'`loco-timm readout {checkpoint}` again')
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OutputExistsError(f'{out} exists and is not empty: choose a new --out folder')
    learner_state = load_file(str(checkpoint / 'learner.safetensors'))
    encoder_state = {k[len('encoder.'):]: v for k, v in learner_state.items() if k.startswith('encoder.')}
    model = build_export_model(hub, encoder_state, head)

    tmp = out.parent / f'.{out.name}.tmp'
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_timm_model(model, hub, tmp)
    shutil.copyfile(checkpoint / 'learner.safetensors', tmp / 'learner.safetensors')
    shutil.copyfile(hub.path, tmp / f'{hub.name}.yaml')
    shutil.copyfile(results_path, tmp / 'readout.json')
    if (readout_dir / 'readout.png').is_file():
        shutil.copyfile(readout_dir / 'readout.png', tmp / 'readout.png')
    summary_path = checkpoint.parent.parent / 'train_summary.json'
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    (tmp / 'README.md').write_text(model_card(hub, results, summary, figure=(tmp / 'readout.png').is_file()))
    plain_permissions(tmp)  # libraries write some files at 0600
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    log(f'exported {checkpoint} as {hub.name} to {out} ({", ".join(sorted(p.name for p in out.iterdir()))})')
    return out
