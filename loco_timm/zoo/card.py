"""Model cards, written from the hub configs (:mod:`loco_timm.zoo.tags`) so that no fact about a tag is typed twice.

* :func:`model_card` - the ``README.md`` of an exported repository: Hub front matter (``library_name: timm``, tags,
  license, datasets, ``model-index`` metrics) and a body with use, recipe, per-stage readout, limitations, BibTeX;
* :func:`zoo_card` - the zoo's ``MODEL_CARD.md``;
* :func:`zoo_table` - the model table of the top-level README (between ``<!-- zoo-table -->`` markers).

``loco-timm cards`` rewrites ``MODEL_CARD.md`` and the README table; ``loco-timm cards --check`` (and the tests) fail
when they disagree with ``hub_configs/``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .tags import HubConfig, list_hub_configs

__all__ = ['model_card', 'zoo_card', 'zoo_table', 'update_cards', 'BIBTEX']

BIBTEX = """@inproceedings{xiong2020loco,
  title     = {LoCo: Local Contrastive Representation Learning},
  author    = {Xiong, Yuwen and Ren, Mengye and Urtasun, Raquel},
  booktitle = {Advances in Neural Information Processing Systems (NeurIPS)},
  year      = {2020},
  eprint    = {2008.01342},
  archivePrefix = {arXiv}
}"""
MODE_NAMES = {'loco': 'LoCo', 'e2e': 'E2E SimCLR', 'gim': 'GIM'}
DATASET_NAMES = {'fashion_mnist': 'Fashion-MNIST', 'cifar10': 'CIFAR-10', 'cifar100': 'CIFAR-100', 'stl10': 'STL-10',
                 'imagefolder': 'ImageNet-1k'}
RECIPE_KEYS = ('mode', 'decoder', 'epochs', 'batch_size', 'optimizer', 'base_lr', 'weight_decay', 'warmup_epochs',
               'temperature', 'crop_scale', 'mixed_precision')
TABLE_START, TABLE_END = '<!-- zoo-table:start -->', '<!-- zoo-table:end -->'
STUDY_START, STUDY_END = '<!-- study:start -->', '<!-- study:end -->'
STUDY_RESULTS = Path('study') / 'fmnist' / 'results.md'  # written by `loco-timm study --out study/fmnist`
STUDY_COMMAND = 'loco-timm study --out study/fmnist'
TREND_RESULTS = Path('study') / 'trend' / 'trend.md'  # written by `loco-timm trend study/fmnist ...`
TREND_START, TREND_END = '<!-- trend:start -->', '<!-- trend:end -->'


def _last(value: Any) -> Any:
    return value[-1] if isinstance(value, (list, tuple)) else value


def _dataset_name(hub: HubConfig) -> str:
    return DATASET_NAMES.get(hub.train.get('dataset', ''), hub.train.get('dataset', '?'))


def _recipe_rows(hub: HubConfig) -> list[str]:
    train = hub.recipe()['train']
    lr = train.get('base_lr', 0.3) * train.get('batch_size', 512) / 256
    rows = [f'| backbone | `{hub.architecture}` {train["model_args"] or ""} at {train["image_size"]} px |',
            f'| data | {_dataset_name(hub)} (`{train.get("dataset")}`), SimCLR augmentations |']
    rows += [f'| {key} | {train[key]} |' for key in RECIPE_KEYS if key in train]
    rows.append(f'| lr | {lr:g} (= base_lr x batch_size / 256), linear warm-up then cosine, per step |')
    readout = hub.readout
    if readout:
        lr = (f'chosen per stage from {readout["lr_grid"]} on a held-out {readout.get("val_fraction", 0.1):g} of '
              f'the training split' if readout.get('lr_grid') else readout.get('lr', 0.1))
        rows.append(f'| readout | linear on frozen pooled features: SGD lr {lr}, momentum '
                    f'{readout.get("momentum")}, {readout.get("epochs")} epochs, /10 at {readout.get("milestones")} of '
                    f'training; kNN k={readout.get("knn_k")} |')
    return ['| recipe | value |', '|---|---|'] + rows


def _stage_table(rows: dict[str, dict[str, list]]) -> list[str]:
    stages = len(rows['model']['linear'])
    lines = ['| features | ' + ' | '.join(f'stage {i + 1}' for i in range(stages)) + ' |',
             '|---|' + '---|' * stages]
    for name, row in rows.items():
        for kind in ('linear', 'knn'):
            values = row.get(kind, [])
            cells = [''] * (stages - len(values)) + [f'{v:.2f}' for v in values]
            lines.append(f'| {name} ({kind}) | ' + ' | '.join(cells) + ' |')
    return lines


def model_card(hub: HubConfig, results: dict | None = None, train_summary: dict | None = None) -> str:
    """The ``README.md`` of an exported repository of ``hub``'s tag, with the readout ``results`` of its weights."""
    from huggingface_hub import EvalResult, ModelCardData
    dataset_id = hub.hub.get('dataset')
    evals = []
    if results:
        top1 = results['rows']['model']['linear'][-1]
        evals.append(EvalResult(task_type='image-classification', dataset_type=dataset_id or hub.train['dataset'],
                                dataset_name=_dataset_name(hub), dataset_split='test', metric_type='accuracy',
                                metric_name='linear readout top-1 (frozen encoder)', metric_value=top1))
    data = ModelCardData(library_name='timm', license=hub.hub.get('license', 'apache-2.0'),
                         tags=['image-classification', 'timm', 'self-supervised', 'contrastive', 'loco', hub.mode],
                         datasets=[dataset_id] if dataset_id else None, pipeline_tag='image-classification',
                         model_name=hub.name, eval_results=evals or None)
    from . import ARCHITECTURES
    native = hub.export_architecture not in ARCHITECTURES  # plain timm builds it from config.json
    load = (f"model = timm.create_model('hf-hub:{hub.repo_id}', pretrained=True)  # plain timm: config.json names "
            f"`{hub.export_architecture}`; `import loco_timm` not needed" if native else
            f"import loco_timm  # registers {hub.architecture}: timm alone cannot build it\n"
            f"model = timm.create_model('{hub.name}', pretrained=True)  # from {hub.repo_id}\n"
            f"# from another repository: timm.create_model('hf-hub:ORG/NAME', pretrained=True)")
    body = [f'# {hub.name}', '', hub.card.get('summary', ''), '',
            f'{MODE_NAMES[hub.mode]} pre-training ([LoCo, arXiv:2008.01342](https://arxiv.org/abs/2008.01342)) '
            f'by loco-timm (`pip install loco-timm`); the classifier is a linear readout on the '
            f'frozen last-stage features (`forward_head(x, pre_logits=True)`).', '',
            '## How to use', '', '```python', 'import timm', load, 'model.eval()',
            'cfg = timm.data.resolve_data_config({}, model=model)  # input size, mean, std, crop',
            'transform = timm.data.create_transform(**cfg)',
            '# per-stage feature maps: timm.create_model(..., pretrained=True, features_only=True)',
            '# pooled features without the readout head: timm.create_model(..., pretrained=True, num_classes=0)',
            '```', '']
    if not native:
        body += [f'`{hub.architecture}` is not in timm itself: `pip install loco-timm` and `import loco_timm` before '
                 f'`timm.create_model`.', '']
    body += ['## Intended use', '',
             'Research on local and self-supervised representation learning: frozen features for linear or kNN '
             'readout, a starting point for fine-tuning, a reference for comparing LoCo with end-to-end SimCLR and '
             'Greedy InfoMax. Not evaluated for deployment.', '',
             '## Training recipe', ''] + _recipe_rows(hub) + ['']
    if results:
        body += ['## Evaluation', '',
                 f'Top-1 (%) on the {_dataset_name(hub)} test split, per stage, for these weights, next to raw pixels '
                 f'and the same encoder at random initialisation (`loco-timm readout`, recipe above):', '']
        body += _stage_table(results['rows']) + ['', '![per-stage readout](readout.png)', '']
        if train_summary:
            body += [f'Training: {train_summary.get("steps")} steps in {train_summary.get("wall_seconds")} s on '
                     f'{train_summary.get("processes")} process(es).', '']
    body += ['## Files', '',
             '- `model.safetensors`, `config.json`: the timm model (encoder + linear readout head);',
             '- `learner.safetensors`: the full `LocalLearner` state (encoder and local decoders), to continue '
             'training;',
             f'- `{hub.name}.yaml`: the hub config (recipe) it was trained and exported with '
             f'(`loco-timm train --config {hub.name}.yaml`);',
             '- `readout.json`, `readout.png`: the evaluation above.', '',
             '## Limitations', '', hub.card.get('limitations', ''), '',
             '## Citation', '', '```bibtex', BIBTEX, '```', '']
    return f'---\n{data.to_yaml()}\n---\n\n' + '\n'.join(body)


def _metric_cell(hub: HubConfig) -> str:
    value = hub.metrics.get('linear_top1')
    return '-' if value is None else f'{_last(value):g}'


def _measured_by(hub: HubConfig) -> str:
    source = hub.metrics.get('source')
    if not source:
        return 'not measured yet'
    return 'the paper' if 'paper' in source else f'loco-timm (`{hub.metrics.get("command", "")}`)'


def zoo_table(configs: list[HubConfig] | None = None) -> str:
    """The README's model table: one row per tag, with its status and who measured its metric."""
    configs = list_hub_configs() if configs is None else configs
    lines = ['| weight tag | method | data | weights | linear top-1 (last stage) | measured by |',
             '|---|---|---|---|---|---|']
    for hub in configs:
        status = f'[published]({"https://huggingface.co/" + hub.repo_id})' if hub.published else 'not published'
        lines.append(f'| `{hub.name}` | {MODE_NAMES[hub.mode]}, {hub.train.get("decoder") or "mlp"} decoder | '
                     f'{_dataset_name(hub)} | {status} | {_metric_cell(hub)} | {_measured_by(hub)} |')
    return '\n'.join(lines)


def trend_section(trend_md: str | None) -> str:
    """The training-budget trend (``study/trend/trend.md``) as it goes into MODEL_CARD.md and the README."""
    if not trend_md:
        return 'Not run yet (`loco-timm trend study/fmnist ...`).'
    return ('The same study at several training budgets (one study folder per budget), written by `loco-timm trend '
            'study/fmnist*` (raw data: `study/trend/trend.json`, plot: `study/trend/trend.png`):\n\n'
            + trend_md.strip())


def study_section(study_md: str | None) -> str:
    """The study's results (``study/fmnist/results.md``) as they go into MODEL_CARD.md and the README."""
    if not study_md:
        return f'Not run yet (`{STUDY_COMMAND}`).'
    return (f'Fashion-MNIST, the main job\'s recipe for every arm, written by `{STUDY_COMMAND}` '
            f'(raw data: `study/fmnist/results.json`, plots: `study/fmnist/readout.png`, `study/fmnist/losses.png`):'
            f'\n\n{study_md.strip()}')


def zoo_card(configs: list[HubConfig] | None = None, study_md: str | None = None,
             trend_md: str | None = None) -> str:
    """The zoo's ``MODEL_CARD.md``, generated from every hub config (and the study's results, if any)."""
    configs = list_hub_configs() if configs is None else configs
    out = ['<!-- Generated from hub_configs/ by `loco-timm cards`; edit the hub configs, not this file. -->', '',
           '# loco-timm model zoo', '',
           'Encoders pre-trained without labels by LoCo (Xiong, Ren & Urtasun, NeurIPS 2020, arXiv:2008.01342), with '
           'end-to-end SimCLR (E2E) and Greedy InfoMax (GIM) trained from the same code as controls. Each weight tag '
           'is a timm model (encoder + linear readout head): `import loco_timm; timm.create_model(TAG, '
           'pretrained=True)`; `features_only=True` and `num_classes=0` work as for timm\'s own models.', '',
           '## Models', '', zoo_table(configs), '',
           'An untagged name resolves to its LoCo tag (`loco_resnet50` is `loco_resnet50.simclr_in1k`). Every tag is '
           'listed by `timm.list_pretrained("loco_*")`, published or not; `pretrained=True` on unpublished weights '
           'raises `loco_timm.PretrainedWeightsNotFound` naming the tag, the repository and how to produce them.', '',
           '## Intended use', '',
           'Research on local learning and self-supervised representations: linear or kNN readout on frozen '
           'features, fine-tuning, and comparing LoCo with E2E and GIM under one recipe. Not evaluated for '
           'deployment; the Fashion-MNIST models are small-scale studies, not classifiers to rely on.', '',
           '## Data', '']
    for name in sorted({_dataset_name(h) for h in configs}):
        tags = ', '.join(f'`{h.name}`' for h in configs if _dataset_name(h) == name)
        ids = sorted({h.hub.get('dataset', '') for h in configs if _dataset_name(h) == name})
        out.append(f'- **{name}** ({", ".join(ids)}): {tags}.')
    out += ['', '## Recipes', '',
            '| weight tag | ' + ' | '.join(RECIPE_KEYS) + ' |', '|---|' + '---|' * len(RECIPE_KEYS)]
    for hub in configs:
        out.append(f'| `{hub.name}` | ' + ' | '.join(str(hub.train.get(k, '-')) for k in RECIPE_KEYS) + ' |')
    out += ['', 'Full recipes: `hub_configs/<tag>.yaml` (`loco-timm train --config TAG` trains one). lr = base_lr x '
            'batch_size / 256 with LARS (biases and norms excluded), linear warm-up then cosine.', '',
            '## Evaluation protocol', '',
            'Linear readout: a linear classifier on frozen, pooled features of each stage (the last stage\'s '
            'features are timm\'s `forward_head(x, pre_logits=True)`, so the readout head is the model\'s classifier), '
            'trained with SGD and a step schedule (each tag\'s `readout:` section); kNN: k=200, cosine similarity, '
            'temperature-weighted votes. Reference rows: raw pixels and the same encoder at random initialisation.', '',
            '## Results', '']
    for hub in configs:
        metrics = hub.metrics
        if not metrics.get('linear_top1'):
            out.append(f'- `{hub.name}`: not measured yet.')
            continue
        line = f'- `{hub.name}` ({MODE_NAMES[hub.mode]}): linear top-1 {metrics["linear_top1"]}'
        if metrics.get('knn_top1'):
            line += f', kNN {metrics["knn_top1"]}'
        refs = [f'{k.replace("_linear_top1", "").replace("_", " ")} {v}' for k, v in metrics.items()
                if k.endswith('_linear_top1')]
        if refs:
            line += f' (references, linear: {"; ".join(refs)})'
        how = ', '.join(str(metrics[k]) for k in ('evaluation', 'machine', 'date') if metrics.get(k))
        line += f'. {metrics["source"][0].upper() + metrics["source"][1:]}' + (f' (`{metrics["command"]}`)' if
                                                                                metrics.get('command') else '')
        out.append(line + (f'; {how}.' if how else '.'))
    out += ['', '### E2E, GIM and LoCo at small scale (the study)', '', study_section(study_md)]
    if trend_md:
        out += ['', '### The training-budget trend', '', trend_section(trend_md)]
    out += ['', '## Limitations', '']
    for text in sorted({h.card.get('limitations', '').strip() for h in configs} - {''}):
        out.append(f'- {text}')
    out += ['', '## Citation', '', '```bibtex', BIBTEX, '```', '']
    return '\n'.join(out)


def update_cards(root: str | Path, check: bool = False) -> list[str]:
    """Write (or with ``check``, compare) ``MODEL_CARD.md`` and the README's model table under ``root``.

    Returns:
        The files that were (or, with ``check``, would be) changed.
    """
    root = Path(root)
    changed = []
    card_path = root / 'MODEL_CARD.md'
    study_md = (root / STUDY_RESULTS).read_text() if (root / STUDY_RESULTS).is_file() else None
    trend_md = (root / TREND_RESULTS).read_text() if (root / TREND_RESULTS).is_file() else None
    card = zoo_card(study_md=study_md, trend_md=trend_md)
    if not card_path.is_file() or card_path.read_text() != card:
        changed.append(str(card_path))
        if not check:
            card_path.write_text(card)
    readme_path = root / 'README.md'
    readme = readme_path.read_text()
    if TABLE_START not in readme or TABLE_END not in readme:
        raise ValueError(f'{readme_path} lacks the {TABLE_START} ... {TABLE_END} markers of the model table')
    head, rest = readme.split(TABLE_START, 1)
    new = f'{head}{TABLE_START}\n{zoo_table()}\n{TABLE_END}{rest.split(TABLE_END, 1)[1]}'
    if STUDY_START in new and STUDY_END in new:
        head, rest = new.split(STUDY_START, 1)
        new = f'{head}{STUDY_START}\n{study_section(study_md)}\n{STUDY_END}{rest.split(STUDY_END, 1)[1]}'
    if TREND_START in new and TREND_END in new:
        head, rest = new.split(TREND_START, 1)
        new = f'{head}{TREND_START}\n{trend_section(trend_md)}\n{TREND_END}{rest.split(TREND_END, 1)[1]}'
    if new != readme:
        changed.append(str(readme_path))
        if not check:
            readme_path.write_text(new)
    return changed
