"""The ``loco-timm`` command: a thin layer that parses, validates and calls the library.

    loco-timm train --config loco_resnet18_small.simclr_fmnist --out-dir runs/fmnist [--epochs 2]
    loco-timm readout runs/fmnist [--epochs 10]
    loco-timm export runs/fmnist --config loco_resnet18_small.simclr_fmnist --out exports/fmnist
    loco-timm publish exports/fmnist --repo-id ORG/NAME
    loco-timm study --out studies/mine [--config TAG] [--seeds 0 1 2]
    loco-timm trend studies/mine studies/mine-10ep --out studies/mine-trend
    loco-timm tags

Every key of the recipe's ``train:`` (or ``readout:``) section is also an option, spelled as in the recipe or with
dashes (``--batch_size 256`` or ``--batch-size 256``; values are read as YAML, so ``--units "[[0, 1], [1, 2]]"``
works). A :class:`~loco_timm.errors.LocoError` (bad input, missing or damaged files, pre-emption) prints one line and
exits with its status (2 for bad input); anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import sys

import torch

from .config import (
    TRAIN_SECTIONS,
    ReadoutConfig,
    TrainConfig,
    apply_overrides,
    declared_keys,
    from_dict,
    load_recipe,
)
from .errors import ConfigError, LocoError, Preempted
from .evaluation.readout import readout
from .evaluation.study import run_study
from .evaluation.trend import write_trend
from .hub.export import export
from .hub.publish import publish
from .models.tags import list_hub_configs
from .training.train import train

__all__ = ['main', 'build_parser', 'add_config_options', 'config_from_args']


def add_config_options(parser: argparse.ArgumentParser, cls: type) -> None:
    """One option per declared key of ``cls``, in one group per section, spelled as in the recipe
    (``--batch_size``) and with dashes (``--batch-size``); the help is the key's declaration."""
    groups = {}
    for k in declared_keys(cls):
        if k.section not in groups:
            about = TRAIN_SECTIONS.get(k.section, 'the linear readout and kNN on frozen features')
            groups[k.section] = parser.add_argument_group(f'{k.section} keys ({about}; override the recipe)')
        flags = ['--' + k.name] + (['--' + k.name.replace('_', '-')] if '_' in k.name else [])
        extra = dict(nargs='?', const='true') if isinstance(k.default, bool) else {}
        choices = f' ({", ".join(str(c) for c in k.choices if c is not None)})' if k.choices else ''
        groups[k.section].add_argument(*flags, dest=f'set_{k.name}', metavar='VALUE', default=None,
                                       help=f'{k.help}{choices}; default: {k.default!r}', **extra)


def config_from_args(args: argparse.Namespace, cls: type, section: str):
    """``cls`` from the ``--config`` recipe's ``section`` with the options given on the command line over it."""
    values = {}
    if args.config:
        values = load_recipe(args.config).get(section) or {}
        if not isinstance(values, dict):
            raise ConfigError(f'section {section}: in {args.config} must be a mapping of keys to values')
    overrides = {k[4:]: v for k, v in vars(args).items() if k.startswith('set_') and v is not None}
    where = f'{section}: section of {args.config}' if args.config else section
    return from_dict(cls, apply_overrides(values, overrides, cls), where=where)


def _train_parser(sub) -> None:
    p = sub.add_parser('train', help='pre-train a backbone (also: accelerate launch -m loco_timm train ...)',
                       description='Pre-train with LoCo, GIM or end-to-end SimCLR through Accelerate.')
    p.add_argument('--config', help='recipe YAML file or weight tag (its train: section)')
    p.add_argument('--resume', action='store_true', help='continue from the latest checkpoint in --out-dir')
    add_config_options(p, TrainConfig)


def _readout_parser(sub) -> None:
    p = sub.add_parser('readout', help='linear readout and kNN per stage of a checkpoint',
                       description='Linear readout and kNN on frozen features of every stage, with raw-pixel and '
                                   'random-init reference rows; writes readout.json (and readout.png with '
                                   'matplotlib).')
    p.add_argument('checkpoint', help='a run folder (its latest checkpoint) or a checkpoint folder')
    p.add_argument('--config', help='recipe YAML file or weight tag (its readout: section)')
    p.add_argument('--out', help='output folder (default: the run folder)')
    p.add_argument('--device', default=None, help='cpu, cuda ... (default: cuda if available)')
    p.add_argument('--reference-cache', metavar='DIR',
                   help='reuse the raw-pixel and random-init rows computed before with the same recipe, data and '
                        'initial encoder from this folder (and add new ones): saves time across many checkpoints')
    add_config_options(p, ReadoutConfig)


def _hub_parsers(sub) -> None:
    p = sub.add_parser('export', help='write a Hub repository folder (timm model, config.json, model card)',
                       description='Export a checkpoint and its readout head as a timm model in a Hugging Face Hub '
                                   'repository folder: model.safetensors, config.json, README.md, '
                                   'learner.safetensors, the hub config, readout.json/png.')
    p.add_argument('checkpoint', help='a run folder (its latest checkpoint) or a checkpoint folder')
    p.add_argument('--config', required=True, help='weight tag (e.g. loco_resnet18_small.simclr_fmnist) or hub '
                                                   'config YAML file')
    p.add_argument('--out', required=True, help='folder to write (must not exist or be empty)')
    p.add_argument('--readout-dir', help='where `loco-timm readout` wrote its results (default: the run folder)')
    p = sub.add_parser('publish', help='upload an export folder to the Hugging Face Hub',
                       description='Upload an export folder to a Hub model repository (created if missing); '
                                   'publishing an unchanged folder again changes nothing.')
    p.add_argument('folder', help='the --out folder of `loco-timm export`')
    p.add_argument('--repo-id', required=True, help='ORG/NAME')
    p.add_argument('--token', help='Hub token with write access (default: HF_TOKEN or `hf auth login`)')
    p.add_argument('--revision', help='branch to commit to (default: main)')
    p.add_argument('--private', action='store_true', help='create the repository as private')
    sub.add_parser('tags', help='list every weight tag with its status and measured metric',
                   description='Every weight tag of hub_configs/: method, data, whether its weights are published, '
                               'the measured last-stage linear top-1 and who measured it.')


def _study_parsers(sub) -> None:
    p = sub.add_parser('study', help='E2E / GIM / LoCo with mlp and conv decoders over seeds (the paper\'s '
                                     'comparison at small scale)',
                       description='Train and read out six arms (e2e_mlp, e2e_conv, gim_mlp, gim_conv, loco_conv, '
                                   'loco_mlp) of one recipe for several seeds; finished runs are skipped, interrupted '
                                   'ones resumed; writes results.json/md and plots to --out.')
    p.add_argument('--out', required=True, help='the study folder (runs, results.json, results.md, plots)')
    p.add_argument('--config', default='loco_resnet18_small.simclr_fmnist', help='recipe or weight tag')
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    p.add_argument('--arms', nargs='+', default=None,
                   help='arm names, or the groups main (the six arms; the default) and ablations (the paper\'s '
                        'ablations with the arms they are compared with)')
    p.add_argument('--set', nargs=2, action='append', default=[], metavar=('KEY', 'VALUE'),
                   help='override a train key for every arm (e.g. --set max_steps 20)')
    p.add_argument('--readout-set', nargs=2, action='append', default=[], metavar=('KEY', 'VALUE'),
                   help='override a readout key (e.g. --readout-set epochs 5)')
    p = sub.add_parser('trend', help='the training-budget trend of study folders (one per epoch budget)',
                       description='Compare the study folders (same recipe, different epochs) on paired per-seed '
                                   'differences; writes trend.json/md (and trend.png with matplotlib) to --out.')
    p.add_argument('folders', nargs='+', help='study folders of one recipe at different epoch budgets')
    p.add_argument('--out', required=True, help='output folder (trend.json, trend.md, trend.png)')


def build_parser() -> argparse.ArgumentParser:
    """The ``loco-timm`` argument parser (one sub-command per entry point)."""
    parser = argparse.ArgumentParser(prog='loco-timm', description='LoCo / GIM / SimCLR training and evaluation for '
                                     'timm backbones (arXiv:2008.01342).')
    sub = parser.add_subparsers(dest='command', required=True)
    for add in (_train_parser, _readout_parser, _hub_parsers, _study_parsers):
        add(sub)
    return parser


def _tags() -> None:
    rows = [(c.name, c.mode, 'published' if c.published else 'not published',
             '-' if c.linear_top1 is None else f'{c.linear_top1:g}', c.measured_by) for c in list_hub_configs()]
    header = ('tag', 'method', 'weights', 'linear top-1', 'measured by')
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(4)]
    for row in [header] + rows:
        print('  '.join(cell.ljust(w) for cell, w in zip(row[:4], widths)) + '  ' + row[4])


def _run(args: argparse.Namespace) -> None:
    command = args.command
    if command == 'train':
        train(config_from_args(args, TrainConfig, 'train'), resume=args.resume)
    elif command == 'readout':
        device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
        readout(args.checkpoint, config_from_args(args, ReadoutConfig, 'readout'), args.out, device=device,
                reference_cache=args.reference_cache)
    elif command == 'export':
        export(args.checkpoint, args.config, args.out, readout_dir=args.readout_dir)
    elif command == 'publish':
        publish(args.folder, args.repo_id, token=args.token, revision=args.revision, private=args.private)
    elif command == 'tags':
        _tags()
    elif command == 'study':
        run_study(args.out, args.config, args.seeds, args.arms,
                  train_overrides=apply_overrides({}, dict(args.set), TrainConfig),
                  readout_overrides=apply_overrides({}, dict(args.readout_set), ReadoutConfig))
    elif command == 'trend':
        report = write_trend(args.folders, args.out)
        print(f'{len(report["budgets"])} budget(s): {args.out}/trend.md' +
              (f', {args.out}/trend.png' if report.get('plot') else ''))


def main(argv: list[str] | None = None) -> int:
    """Run the ``loco-timm`` command; returns its exit status."""
    args = build_parser().parse_args(argv)
    try:
        _run(args)
    except LocoError as err:  # a pre-emption is no error: it checkpointed and asks for --resume
        print(f'loco-timm {args.command}: {"" if isinstance(err, Preempted) else "error: "}{err}', file=sys.stderr)
        return err.exit_code
    return 0


if __name__ == '__main__':
    sys.exit(main())
