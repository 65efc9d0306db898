"""Repository tool: the zoo's ``MODEL_CARD.md`` and the generated sections of the README and the documentation,
written from ``hub_configs/``, the committed study results and the recipe keys' declarations, so that no fact is typed
twice.

    python tools/cards.py                     # rewrite MODEL_CARD.md and the generated sections
    python tools/cards.py --check             # exit 1 when they are out of date (CI runs this through the tests)
    python tools/cards.py --from-study study/fmnist   # first write the metrics a study measured into hub_configs/

A generated section sits between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->`` in ``README.md`` or a page of
``docs/``: ``zoo-table``, ``study``, ``trend`` and ``recipe-keys`` are written here, the benchmarks' tables by the
benchmarks (``benchmarks/doc_blocks.py``). The library (``loco_timm``) writes none of these files.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ''):  # run as a script: the repository root is the import root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loco_timm.config import TRAIN_SECTIONS, ReadoutConfig, TrainConfig, declared_keys  # noqa: E402
from loco_timm.hub.card import BIBTEX, MODE_NAMES, dataset_name, recipe_keys  # noqa: E402
from loco_timm.models.tags import HubConfig, list_hub_configs  # noqa: E402
from tools.study_metrics import record_study_metrics  # noqa: E402

__all__ = ['zoo_card', 'zoo_table', 'update_cards', 'main']

TABLE_START, TABLE_END = '<!-- zoo-table:start -->', '<!-- zoo-table:end -->'
STUDY_START, STUDY_END = '<!-- study:start -->', '<!-- study:end -->'
TREND_START, TREND_END = '<!-- trend:start -->', '<!-- trend:end -->'
STUDY_RESULTS = Path('study') / 'fmnist' / 'results.md'  # written by `loco-timm study --out study/fmnist`
STUDY_COMMAND = 'loco-timm study --out study/fmnist'
TREND_RESULTS = Path('study') / 'trend' / 'trend.md'  # written by TREND_COMMAND
TREND_COMMAND = 'loco-timm trend study/fmnist study/fmnist-10ep --out study/trend'


def _metric_cell(hub: HubConfig) -> str:
    value = hub.linear_top1
    return '-' if value is None else f'{value:g}'


def zoo_table(configs: list[HubConfig] | None = None) -> str:
    """The README's model table: one row per tag, with its status and who measured its metric."""
    configs = list_hub_configs() if configs is None else configs
    lines = ['| weight tag | method | data | weights | linear top-1 (last stage) | measured by |',
             '|---|---|---|---|---|---|']
    for hub in configs:
        status = f'[published]({"https://huggingface.co/" + hub.repo_id})' if hub.published else 'not published'
        lines.append(f'| `{hub.name}` | {MODE_NAMES[hub.mode]}, {hub.train.get("decoder") or "mlp"} decoder | '
                     f'{dataset_name(hub)} | {status} | {_metric_cell(hub)} | {hub.measured_by} |')
    return '\n'.join(lines)


def trend_section(trend_md: str | None) -> str:
    """The training-budget trend (``study/trend/trend.md``) as it goes into MODEL_CARD.md and the README."""
    if not trend_md:
        return f'Not run yet (`{TREND_COMMAND}`).'
    return (f'The same study at several training budgets (one study folder per budget), written by `{TREND_COMMAND}` '
            f'(raw data: `study/trend/trend.json`, plot: `study/trend/trend.png`):\n\n' + trend_md.strip())


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
    out = ['<!-- Generated from hub_configs/ by `python tools/cards.py`; edit the hub configs, not this file. -->', '',
           '# loco-timm model zoo', '',
           'Encoders pre-trained without labels by LoCo (Xiong, Ren & Urtasun, NeurIPS 2020, arXiv:2008.01342), with '
           'end-to-end SimCLR (E2E) and Greedy InfoMax (GIM) trained from the same code as controls. Each weight tag '
           'is a timm model (encoder + linear readout head): `import loco_timm; timm.create_model(TAG, '
           'pretrained=True)`; `features_only=True` and `num_classes=0` work as for timm\'s own models.', '',
           '## Models', '', zoo_table(configs), '',
           'An untagged name resolves to its LoCo tag (`loco_resnet50` is `loco_resnet50.simclr_in1k`). '
           '`timm.list_pretrained("loco_*")` lists the tags whose weights are published, as timm lists its own; '
           'every tag is creatable (`loco-timm tags` lists them all), and `pretrained=True` on unpublished weights '
           'raises `loco_timm.PretrainedWeightsNotFound` naming the tag, the repository and how to produce them.', '',
           '## Intended use', '',
           'Research on local learning and self-supervised representations: linear or kNN readout on frozen '
           'features, fine-tuning, and comparing LoCo with E2E and GIM under one recipe. Not evaluated for '
           'deployment; the Fashion-MNIST models are small-scale studies, not classifiers to rely on.', '',
           '## Data', '']
    for name in sorted({dataset_name(h) for h in configs}):
        tags = ', '.join(f'`{h.name}`' for h in configs if dataset_name(h) == name)
        ids = sorted({h.hub.get('dataset', '') for h in configs if dataset_name(h) == name})
        out.append(f'- **{name}** ({", ".join(ids)}): {tags}.')
    keys = recipe_keys(*(hub.train for hub in configs))
    out += ['', '## Recipes', '', '| weight tag | ' + ' | '.join(keys) + ' |', '|---|' + '---|' * len(keys)]
    for hub in configs:
        out.append(f'| `{hub.name}` | ' + ' | '.join(str(hub.train.get(k, '-')) for k in keys) + ' |')
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


def recipe_keys_markdown() -> str:
    """Every recipe key, one table per section, from the keys' declarations (``loco_timm.config``)."""
    out = []
    for cls, sections in ((TrainConfig, TRAIN_SECTIONS), (ReadoutConfig, {'readout': 'the readout: section'})):
        keys = declared_keys(cls)
        for section, about in sections.items():
            out += [f'**{section}** ({about})', '', '| key | default | resume | help |', '|---|---|---|---|']
            for k in (k for k in keys if k.section == section):
                choices = f' One of: {", ".join(str(c) for c in k.choices if c is not None)}.' if k.choices else ''
                resume = 'must match' if k.resume else 'may change'
                out.append(f'| `{k.name}` | `{k.default!r}` | {resume} | {_cell(k.help)}.{choices} |')
            out.append('')
    return '\n'.join(out).rstrip()


def _cell(text: str) -> str:
    return text.replace('|', '\\|')


def _replace_block(text: str, name: str, body: str) -> str:
    start, end = f'<!-- {name}:start -->', f'<!-- {name}:end -->'
    if start not in text or end not in text:
        return text
    head, rest = text.split(start, 1)
    return f'{head}{start}\n{body}\n{end}{rest.split(end, 1)[1]}'


def update_cards(root: str | Path, check: bool = False) -> list[str]:
    """Write (or with ``check``, compare) ``MODEL_CARD.md`` and the generated blocks of ``README.md`` and the pages of
    ``docs/`` under ``root``: the zoo table, the study and trend results and the recipe keys, wherever their markers
    are.

    Returns:
        The files that were (or, with ``check``, would be) changed.

    Raises:
        ValueError: No file holds the zoo table's markers.
    """
    root = Path(root)
    study_md = (root / STUDY_RESULTS).read_text() if (root / STUDY_RESULTS).is_file() else None
    trend_md = (root / TREND_RESULTS).read_text() if (root / TREND_RESULTS).is_file() else None
    blocks = {'zoo-table': zoo_table(), 'study': study_section(study_md), 'trend': trend_section(trend_md),
              'recipe-keys': recipe_keys_markdown()}
    files = {root / 'MODEL_CARD.md': zoo_card(study_md=study_md, trend_md=trend_md)}
    for path in [root / 'README.md', *sorted((root / 'docs').glob('**/*.md'))]:
        if path.is_file():
            text = path.read_text()
            for name, body in blocks.items():
                text = _replace_block(text, name, body)
            files[path] = text
    if not any(TABLE_START in text for text in files.values()):
        raise ValueError(f'no page under {root} holds the {TABLE_START} ... {TABLE_END} markers of the model table')
    changed = []
    for path, text in files.items():
        if not path.is_file() or path.read_text() != text:
            changed.append(str(path))
            if not check:
                path.write_text(text)
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='tools/cards.py', description=__doc__.split('\n')[0])
    parser.add_argument('--root', default=str(Path(__file__).resolve().parents[1]),
                        help='the repository checkout (default: this one)')
    parser.add_argument('--check', action='store_true', help='do not write; exit 1 when a file is out of date')
    parser.add_argument('--from-study', nargs='+', default=[], metavar='STUDY',
                        help='study folders whose runs measured tags: their metrics go into hub_configs/ (a tag '
                             'measured otherwise, by the paper or the main job, keeps its metrics)')
    args = parser.parse_args(argv)
    if args.from_study and args.check:
        parser.error('--from-study writes hub configs: run it without --check')
    for study in args.from_study:
        recorded = record_study_metrics(study, Path(args.root) / 'hub_configs')
        print(f'{study}: recorded metrics in {", ".join(recorded) or "no hub config (none new)"}')
    changed = update_cards(args.root, check=args.check)
    verb = 'out of date' if args.check else 'written'
    print(f'{verb}: {", ".join(changed)}' if changed else
          'MODEL_CARD.md and the generated sections are up to date')
    return 1 if args.check and changed else 0


if __name__ == '__main__':
    sys.exit(main())
