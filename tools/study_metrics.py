"""Repository tool: a tag's measured results from a study, the ``metrics:`` section of its hub config written from
a study's runs.

The study (:mod:`loco_timm.evaluation.study`) trains and reads out each arm with its tag's recipe; a run whose recipe
(the study's recipe with its overrides, the arm's mode and decoder, the run's seed) equals a tag's recipe measures
that tag. :func:`record_study_metrics` writes such a run's per-stage readout into the tag's ``metrics:`` section,
with the command that reproduces it, and leaves every other line of the file as it is. A tag already measured
otherwise (the paper's figures, the README's main job) keeps its metrics.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import yaml

from loco_timm.config import ReadoutConfig, TrainConfig, from_dict
from loco_timm.errors import MissingFileError
from loco_timm.evaluation.study import arm_overrides
from loco_timm.files import plain_permissions
from loco_timm.hub.card import dataset_name
from loco_timm.models.tags import HubConfig, list_hub_configs, reload_hub_configs

__all__ = ['study_metrics', 'record_study_metrics', 'STUDY_SOURCE']

STUDY_SOURCE = 'measured by this project, one run of the study'


def _normal(cls: type, values: dict) -> dict:
    """A recipe section with the defaults filled in, as the run saw it."""
    return json.loads(json.dumps(dataclasses.asdict(from_dict(cls, dict(values)))))


def _evaluation(readout: dict, dataset: str) -> str:
    grid = readout.get('lr_grid')
    linear = (f'lr per row and stage from {grid} on a held-out {readout.get("val_fraction", 0.1):.0%} of the '
              f'training split' if grid else f'lr {readout.get("lr")}')
    return (f'linear readout ({linear}) and kNN (k={readout.get("knn_k", 200)}) on frozen features, {dataset} test '
            f'split')


def study_metrics(study: str | Path, configs: list[HubConfig] | None = None,
                  root: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """The metrics a study measured, per tag whose recipe one of its runs trained.

    Args:
        study: A study folder (its ``results.json``, written by ``loco-timm study``).
        configs: The tags to match (default: every hub config).
        root: The folder the recorded command runs from (default: the current one); the study is named relative
            to it when inside it.

    Returns:
        Tag name -> its ``metrics:`` section.
    """
    path = Path(study) / 'results.json'
    if not path.is_file():
        raise MissingFileError(f'{path}: no study results here; run loco-timm study --out {study} first')
    results = json.loads(path.read_text())
    recipe = results['recipe']
    root = Path(root or Path.cwd()).resolve()
    folder = Path(study).resolve()
    named = folder.relative_to(root).as_posix() if folder.is_relative_to(root) else str(study)
    found = {}
    for hub in list_hub_configs() if configs is None else configs:
        tag = hub.recipe()
        want_train, want_readout = _normal(TrainConfig, tag['train']), _normal(ReadoutConfig, tag['readout'])
        if _normal(ReadoutConfig, dict(recipe['readout'], **results.get('readout_overrides', {}))) != want_readout:
            continue
        for run in results['runs']:
            train = dict(recipe['train'], **results.get('train_overrides', {}), **arm_overrides(run['arm']),
                         seed=run['seed'])
            if _normal(TrainConfig, train) != want_train:
                continue
            command = f'loco-timm study --out {named} --config {results["config"]}'
            for key, value in results.get('train_overrides', {}).items():
                command += f' --set {key} {json.dumps(value)}'
            for key, value in results.get('readout_overrides', {}).items():
                command += f' --readout-set {key} {json.dumps(value)}'
            metrics = dict(source=STUDY_SOURCE, command=f'{command} --arms {run["arm"]} --seeds {run["seed"]}')
            if run.get('machine'):
                metrics['machine'] = run['machine']
            metrics.update(evaluation=_evaluation(want_readout, dataset_name(hub)), linear_top1=run['linear'],
                           knn_top1=run['knn'])
            for name, values in (run.get('references') or {}).items():
                metrics[f'{name}_linear_top1'] = values[-1] if len(values) == 1 else values
            metrics.update(train_seconds=round(run['train_seconds']), readout_seconds=round(run['readout_seconds']))
            found[hub.name] = metrics
            break
    return found


def _replace_metrics(text: str, metrics: dict) -> str:
    """``text`` (a hub config) with its top-level ``metrics:`` section replaced, every other line kept."""
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.startswith('metrics:')), None)
    block = yaml.safe_dump(dict(metrics=metrics), sort_keys=False, width=200, default_flow_style=None,
                           allow_unicode=True)
    if start is None:
        return text + ('' if text.endswith('\n') else '\n') + block
    end = next((i for i in range(start + 1, len(lines))
                if lines[i].strip() and not lines[i][0].isspace() and not lines[i].startswith('#')), len(lines))
    return ''.join(lines[:start]) + block + ''.join(lines[end:])


def record_study_metrics(study: str | Path, folder: str | Path | None = None) -> list[str]:
    """Write the metrics a study measured into the hub configs of the tags it trained (see the module docstring).

    Args:
        study: A study folder.
        folder: The hub configs' folder (default: the one the package reads).

    Returns:
        The hub config files that changed.
    """
    configs = list_hub_configs(folder)
    root = Path(folder).resolve().parent if folder is not None else None
    changed = []
    for name, metrics in study_metrics(study, configs, root).items():
        hub = next(h for h in configs if h.name == name)
        if hub.metrics and hub.metrics.get('source') != STUDY_SOURCE:
            continue  # measured otherwise: the paper, or the README's main job
        text = hub.path.read_text()
        new = _replace_metrics(text, metrics)
        if new == text:
            continue
        before, after = yaml.safe_load(text), yaml.safe_load(new)
        if after.get('metrics') != metrics or {k: v for k, v in after.items() if k != 'metrics'} != {
                k: v for k, v in before.items() if k != 'metrics'}:
            raise RuntimeError(f'{hub.path}: rewriting its metrics section would change other sections')
        tmp = hub.path.with_name(f'.{hub.path.name}.tmp')
        tmp.write_text(new)
        plain_permissions(tmp)
        tmp.replace(hub.path)
        changed.append(str(hub.path))
    if changed:
        reload_hub_configs()
    return changed
