"""The model card of an exported repository, written from its hub config (:mod:`loco_timm.models.tags`) so that no
fact about a tag is typed twice: Hub front matter (``library_name: timm``, tags, license, datasets, ``model-index``
metrics) and a body with use, recipe, per-stage readout, limitations and BibTeX.
"""
from __future__ import annotations

from huggingface_hub import EvalResult, ModelCardData

from ..config import TrainConfig, declared_keys
from ..models import ARCHITECTURES
from ..models.tags import HubConfig

__all__ = ['model_card', 'dataset_name', 'recipe_keys', 'BIBTEX', 'MODE_NAMES']

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


def dataset_name(hub: HubConfig) -> str:
    return DATASET_NAMES.get(hub.train.get('dataset', ''), hub.train.get('dataset', '?'))


def recipe_keys(*trains: dict) -> list[str]:
    """The recipe keys a card shows: those the given ``train:`` sections set that change what a run trains (declared
    ``resume=True``), in declaration order."""
    return [k.name for k in declared_keys(TrainConfig) if k.resume and any(k.name in t for t in trains)]


def _recipe_rows(hub: HubConfig) -> list[str]:
    train = hub.recipe()['train']
    lr = train.get('base_lr', 0.3) * train.get('batch_size', 512) / 256
    rows = [f'| backbone | `{hub.architecture}` {train["model_args"] or ""} at {train["image_size"]} px |',
            f'| data | {dataset_name(hub)} (`{train.get("dataset")}`), SimCLR augmentations |']
    rows += [f'| {key} | {train[key]} |' for key in recipe_keys(hub.train)]
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


def model_card(hub: HubConfig, results: dict | None = None, train_summary: dict | None = None, *,
               figure: bool = True) -> str:
    """The ``README.md`` of an exported repository of ``hub``'s tag, with the readout ``results`` of its weights
    (``figure``: the repository has the readout's ``readout.png``)."""
    dataset_id = hub.hub.get('dataset')
    evals = []
    if results:
        top1 = results['rows']['model']['linear'][-1]
        evals.append(EvalResult(task_type='image-classification', dataset_type=dataset_id or hub.train['dataset'],
                                dataset_name=dataset_name(hub), dataset_split='test', metric_type='accuracy',
                                metric_name='linear readout top-1 (frozen encoder)', metric_value=top1))
    data = ModelCardData(library_name='timm', license=hub.hub.get('license', 'apache-2.0'),
                         tags=['image-classification', 'timm', 'self-supervised', 'contrastive', 'loco', hub.mode],
                         datasets=[dataset_id] if dataset_id else None, pipeline_tag='image-classification',
                         model_name=hub.name, eval_results=evals or None)
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
                 f'Top-1 (%) on the {dataset_name(hub)} test split, per stage, for these weights, next to raw pixels '
                 f'and the same encoder at random initialisation (`loco-timm readout`, recipe above):', '']
        body += _stage_table(results['rows']) + (['', '![per-stage readout](readout.png)', ''] if figure else [''])
        if train_summary:
            body += [f'Training: {train_summary.get("steps")} steps in {train_summary.get("wall_seconds")} s on '
                     f'{train_summary.get("processes")} process(es).', '']
    body += ['## Files', '',
             '- `model.safetensors`, `config.json`: the timm model (encoder + linear readout head);',
             '- `learner.safetensors`: the full `LocalLearner` state (encoder and local decoders), to continue '
             'training;',
             f'- `{hub.name}.yaml`: the hub config (recipe) it was trained and exported with '
             f'(`loco-timm train --config {hub.name}.yaml`);',
             f'- `readout.json`{", `readout.png`" if figure else ""}: the evaluation above.', '',
             '## Limitations', '', hub.card.get('limitations', ''), '',
             '## Citation', '', '```bibtex', BIBTEX, '```', '']
    return f'---\n{data.to_yaml()}\n---\n\n' + '\n'.join(body)
