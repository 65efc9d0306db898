"""The ``loco-timm`` command: a thin layer that parses, validates and calls the library.

    loco-timm train --config loco_resnet18_small.simclr_fmnist --out-dir runs/fmnist [--epochs 2]
    loco-timm readout runs/fmnist [--epochs 10]
    loco-timm export runs/fmnist --config loco_resnet18_small.simclr_fmnist --out exports/fmnist
    loco-timm publish exports/fmnist --repo-id ORG/NAME
    loco-timm cards [--check] [--from-study study/fmnist]

Every key of the recipe's ``train:`` (or ``readout:``) section is also an option (``--batch-size 256``; values are
read as YAML, so ``--units "[[0, 1], [1, 2]]"`` works). Bad input prints one line naming the problem and exits 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

from .config import ConfigError, ReadoutConfig, TrainConfig, apply_overrides, from_dict
from .recipes import load_recipe

__all__ = ['main', 'build_parser', 'train_config_from_args', 'readout_config_from_args']


def _add_fields(parser: argparse.ArgumentParser, cls: type) -> None:
    group = parser.add_argument_group(f'{cls.__name__} keys (override the recipe)')
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        flag = '--' + f.name.replace('_', '-')
        kwargs = dict(nargs='?', const='true') if isinstance(default, bool) else {}
        group.add_argument(flag, dest=f'set_{f.name}', metavar='VALUE', default=None,
                           help=f'default: {default!r}', **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='loco-timm', description='LoCo / GIM / SimCLR training and evaluation for '
                                     'timm backbones (arXiv:2008.01342).')
    sub = parser.add_subparsers(dest='command', required=True)
    train = sub.add_parser('train', help='pre-train a backbone (also: accelerate launch -m loco_timm train ...)',
                           description='Pre-train with LoCo, GIM or end-to-end SimCLR through Accelerate.')
    train.add_argument('--config', help='recipe YAML file (its train: section)')
    train.add_argument('--resume', action='store_true', help='continue from the latest checkpoint in --out-dir')
    _add_fields(train, TrainConfig)
    read = sub.add_parser('readout', help='linear readout and kNN per stage of a checkpoint',
                          description='Linear readout and kNN on frozen features of every stage, with raw-pixel and '
                                      'random-init reference rows; writes readout.json and readout.png.')
    read.add_argument('checkpoint', help='a run folder (its latest checkpoint) or a checkpoint folder')
    read.add_argument('--config', help='recipe YAML file (its readout: section)')
    read.add_argument('--out', help='output folder (default: the run folder)')
    read.add_argument('--device', default=None, help='cpu, cuda ... (default: cuda if available)')
    read.add_argument('--reference-cache', metavar='DIR',
                      help='reuse the raw-pixel and random-init rows computed before with the same recipe, data and '
                           'initial encoder from this folder (and add new ones): saves time across many checkpoints')
    _add_fields(read, ReadoutConfig)
    exp = sub.add_parser('export', help='write a Hub repository folder (timm model, config.json, model card)',
                         description='Export a checkpoint and its readout head as a timm model in a Hugging Face '
                                     'Hub repository folder: model.safetensors, config.json, README.md, '
                                     'learner.safetensors, the hub config, readout.json/png.')
    exp.add_argument('checkpoint', help='a run folder (its latest checkpoint) or a checkpoint folder')
    exp.add_argument('--config', required=True, help='weight tag (e.g. loco_resnet18_small.simclr_fmnist) or hub '
                                                     'config YAML file')
    exp.add_argument('--out', required=True, help='folder to write (must not exist or be empty)')
    exp.add_argument('--readout-dir', help='where `loco-timm readout` wrote its results (default: the run folder)')
    pub = sub.add_parser('publish', help='upload an export folder to the Hugging Face Hub',
                         description='Upload an export folder to a Hub model repository (created if missing); '
                                     'publishing an unchanged folder again changes nothing.')
    pub.add_argument('folder', help='the --out folder of `loco-timm export`')
    pub.add_argument('--repo-id', required=True, help='ORG/NAME')
    pub.add_argument('--token', help='Hub token with write access (default: HF_TOKEN or `hf auth login`)')
    pub.add_argument('--revision', help='branch to commit to (default: main)')
    pub.add_argument('--private', action='store_true', help='create the repository as private')
    study = sub.add_parser('study', help='E2E / GIM / LoCo with mlp and conv decoders over seeds (the paper\'s '
                                         'comparison at small scale)',
                           description='Train and read out six arms (e2e_mlp, e2e_conv, gim_mlp, gim_conv, loco_conv, '
                                       'loco_mlp) of one recipe for several seeds; finished runs are skipped, '
                                       'interrupted ones resumed; writes results.json/md and plots to --out.')
    study.add_argument('--out', required=True, help='the study folder (runs, results.json, results.md, plots)')
    study.add_argument('--config', default='loco_resnet18_small.simclr_fmnist', help='recipe or weight tag')
    study.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    study.add_argument('--arms', nargs='+', default=None,
                       help='arm names, or the groups main (the six arms; the default) and ablations (the paper\'s '
                            'ablations with the arms they are compared with)')
    study.add_argument('--set', nargs=2, action='append', default=[], metavar=('KEY', 'VALUE'),
                       help='override a train key for every arm (e.g. --set max_steps 20)')
    study.add_argument('--readout-set', nargs=2, action='append', default=[], metavar=('KEY', 'VALUE'),
                       help='override a readout key (e.g. --readout-set epochs 5)')
    trend_p = sub.add_parser('trend', help='the training-budget trend of study folders (one per epoch budget)',
                             description='Compare the study folders (same recipe, different epochs) on paired '
                                         'per-seed differences; writes trend.json/md/png to --out.')
    trend_p.add_argument('folders', nargs='+', help='study folders, e.g. study/fmnist study/fmnist-10ep')
    trend_p.add_argument('--out', default='study/trend', help='output folder (default: study/trend)')
    cards = sub.add_parser('cards', help='regenerate MODEL_CARD.md and the README model table from hub_configs/',
                           description='Write MODEL_CARD.md and the README model table from hub_configs/ '
                                       '(--check: only report whether they are up to date, exit 1 if not; '
                                       '--from-study: first write the metrics of every tag a study trained with '
                                       'its recipe into its hub config).')
    cards.add_argument('--root', default='.', help='the repository checkout (default: .)')
    cards.add_argument('--check', action='store_true', help='do not write; exit 1 when a file is out of date')
    cards.add_argument('--from-study', nargs='+', default=[], metavar='STUDY',
                       help='study folders whose runs measured tags: their metrics go into hub_configs/ (a tag '
                            'measured otherwise, by the paper or the main job, keeps its metrics)')
    return parser


def _config_from_args(args: argparse.Namespace, cls: type, section: str):
    values = {}
    if args.config:
        values = load_recipe(args.config).get(section) or {}
        if not isinstance(values, dict):
            raise ConfigError(f'section {section}: in {args.config} must be a mapping of keys to values')
    overrides = {k[4:]: v for k, v in vars(args).items() if k.startswith('set_') and v is not None}
    return from_dict(cls, apply_overrides(values, overrides, cls), where=f'{section}: section of {args.config}'
                     if args.config else section)


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    return _config_from_args(args, TrainConfig, 'train')


def readout_config_from_args(args: argparse.Namespace) -> ReadoutConfig:
    return _config_from_args(args, ReadoutConfig, 'readout')


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == 'train':
            from .training.train import train
            train(train_config_from_args(args), resume=args.resume)
        elif args.command == 'readout':
            import torch
            from .evaluation.readout import readout
            device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
            readout(args.checkpoint, readout_config_from_args(args), args.out, device=device,
                    reference_cache=args.reference_cache)
        elif args.command == 'export':
            from .zoo.export import export
            export(args.checkpoint, args.config, args.out, args.readout_dir)
        elif args.command == 'publish':
            from .zoo.hub import publish
            publish(args.folder, args.repo_id, token=args.token, revision=args.revision, private=args.private)
        elif args.command == 'study':
            from .evaluation.study import run_study
            train_overrides = apply_overrides({}, dict(args.set), TrainConfig)
            readout_overrides = apply_overrides({}, dict(args.readout_set), ReadoutConfig)
            run_study(args.out, args.config, args.seeds, args.arms, train_overrides, readout_overrides)
            from pathlib import Path
            from .zoo.card import STUDY_RESULTS, update_cards
            if (Path(args.out) / 'results.md').resolve() == STUDY_RESULTS.resolve() and Path('README.md').is_file():
                print(f'updated: {", ".join(update_cards(".")) or "nothing"}')  # the repository's study tables
        elif args.command == 'trend':
            from .evaluation.trend import write_trend
            report = write_trend(args.folders, args.out)
            print(f'{len(report["budgets"])} budget(s): {args.out}/trend.md, {args.out}/trend.png')
        elif args.command == 'cards':
            from pathlib import Path
            from .zoo.card import update_cards
            from .zoo.metrics import record_study_metrics
            if args.from_study and args.check:
                raise ValueError('--from-study writes hub configs: run it without --check')
            for study in args.from_study:
                recorded = record_study_metrics(study, Path(args.root) / 'hub_configs')
                print(f'{study}: recorded metrics in {", ".join(recorded) or "no hub config (none new)"}')
            changed = update_cards(args.root, check=args.check)
            verb = 'out of date' if args.check else 'written'
            print(f'{verb}: {", ".join(changed)}' if changed else 'MODEL_CARD.md and README model table up to date')
            return 1 if args.check and changed else 0
    except (ConfigError, ValueError, FileNotFoundError, FileExistsError) as err:
        print(f'loco-timm {args.command}: error: {err}', file=sys.stderr)
        return 2
    except RuntimeError as err:
        if type(err).__name__ == 'Preempted':
            from .training.runlock import PREEMPTED_EXIT
            print(f'loco-timm {args.command}: {err}', file=sys.stderr)
            return PREEMPTED_EXIT
        if type(err).__name__ not in ('NonFiniteLossError', 'PublishError') and 'unreadable image' not in str(err):
            raise
        print(f'loco-timm {args.command}: error: {err}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
