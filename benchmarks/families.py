"""Does local contrastive learning work beyond ResNets? E2E, GIM and LoCo side by side across timm's families.

Each family is one small member, compute-matched to ``loco_resnet18_small`` (0.5x-2x its multiply-adds per image) with
the family's own timm constructor arguments, trained with the main job's recipe: its hub config
``hub_configs/<model>.simclr_fmnist.yaml`` (:data:`FAMILIES`). Per family, ``loco-timm study`` trains and reads out the
arms ``e2e_mlp``, ``gim_conv`` and ``loco_conv`` over the seeds in ``study/families/<family>/`` (the ResNet of the main
job is the reference, with its runs in ``study/fmnist``); the seeds go round all families before the next one starts,
so an interrupted table is complete for every family up to its last seed, and a rerun resumes where it stopped.

The table pairs each seed's arms (LoCo - E2E, LoCo - GIM: mean +- standard error, judged held / did not hold /
unresolved on mean +- 2 s.e. as the training-budget trend judges them), gives the per-stage readout, what LoCo and GIM
save against E2E (peak saved activations and step time of one ``LocalLearner.step`` at the recipe's batch, measured as
``benchmarks/schedule.py`` measures them) and each member's multiply-adds and parameters.

    .venv/bin/python benchmarks/families.py                      # every family: studies, costs, table, figure
    .venv/bin/python benchmarks/families.py --families convnext --seeds 0    # one family's seed 0
    .venv/bin/python benchmarks/families.py --report-only        # the table and figure from the recorded runs

Writes ``benchmarks/results/families.json``, ``benchmarks/results/families.png``, the documentation block
``families`` (docs/families.md) and the README's copy of the table (block ``families-summary``).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))
from doc_blocks import cpu_name, replace_block  # noqa: E402
from schedule import measure  # noqa: E402

from loco_timm.errors import LocoError, Preempted  # noqa: E402
from loco_timm.evaluation.plots import pyplot  # noqa: E402
from loco_timm.evaluation.study import run_study  # noqa: E402
from loco_timm.evaluation.trend import PAIRS, TABLES, judge  # noqa: E402
from tools.anatomy import anatomy  # noqa: E402
from tools.macs import macs_and_params, recipe_of  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / 'benchmarks' / 'results'
STUDIES = ROOT / 'study' / 'families'
REFERENCE = 'resnet'
FAMILIES = {  # family (timm module): its member's hub config
    REFERENCE: 'loco_resnet18_small.simclr_fmnist',
    'vision_transformer': 'vit_tiny_patch16_224.simclr_fmnist',
    'swin_transformer': 'swin_tiny_patch4_window7_224.simclr_fmnist',
    'convnext': 'convnext_atto.simclr_fmnist',
    'efficientnet': 'efficientnet_b1.simclr_fmnist',
    'regnet': 'regnetx_006.simclr_fmnist',
    'maxxvit': 'coatnet_nano_rw_224.simclr_fmnist',
}
ARMS = ('e2e_mlp', 'gim_conv', 'loco_conv')
MAIN_PAIRS = ('LoCo - E2E', 'LoCo - GIM')  # of the trend's pairs, those of these arms (not the L2 ablation's)
COSTS = (('e2e', 'mlp'), ('gim', 'conv'), ('loco', 'conv'))


def study_folder(family: str) -> Path:
    """Where a family's runs are: the main job's study for the reference, ``study/families/<family>`` else."""
    return ROOT / 'study' / 'fmnist' if family == REFERENCE else STUDIES / family


def run_studies(families: list[str], seeds: list[int]) -> None:
    """Train and read out every (family, seed, arm) not recorded yet, seed by seed across the families."""
    for seed in seeds:
        for family in families:
            print(f'== {family} seed {seed}', flush=True)
            run_study(study_folder(family), FAMILIES[family], [seed], list(ARMS))


def costs(tag: str, steps: int = 3) -> dict:
    """MACs, parameters, and per mode the peak saved activations and median step time of one learner step at the
    recipe's batch (:func:`schedule.measure`)."""
    cfg = recipe_of(tag)
    macs, params = macs_and_params(tag)
    size = (1, cfg.image_size, cfg.image_size)
    rows = {mode: measure(cfg.backbone, size, cfg.batch_size, dict(cfg.model_args), mode, decoder, False, steps)
            for mode, decoder in COSTS}
    return dict(macs=macs, params=params, batch=cfg.batch_size, modes=rows, machine=cpu_name(),
                date=time.strftime('%Y-%m-%d'), threads=torch.get_num_threads())


def _paired(runs: list[dict], a: str, b: str) -> list[tuple[int, float]]:
    by = {(r['arm'], r['seed']): r['linear'][-1] for r in runs}
    return [(s, by[(a, s)] - by[(b, s)]) for s in sorted({r['seed'] for r in runs}) if (a, s) in by and (b, s) in by]


def summarize(family: str, cost: dict | None) -> dict:
    """One family's row: its runs' paired differences with their judgement, per-stage readout, and its costs."""
    path = study_folder(family) / 'results.json'
    runs = [r for r in json.loads(path.read_text())['runs'] if r['arm'] in ARMS] if path.is_file() else []
    row = dict(family=family, tag=FAMILIES[family], pairs={}, per_stage={}, seeds={})
    for label in MAIN_PAIRS:
        diffs = [d for _, d in _paired(runs, *PAIRS[label])]
        if diffs:
            se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else None
            row['pairs'][label] = dict(diffs=diffs, mean=statistics.fmean(diffs), se=se, judgement=judge(label, diffs))
    row['references'] = next((r['references'] for r in runs if r.get('references')), {})  # the same for every run
    for arm in ARMS:
        mine = [r['linear'] for r in runs if r['arm'] == arm]
        if mine:
            row['seeds'][arm] = sorted(r['seed'] for r in runs if r['arm'] == arm)
            row['per_stage'][arm] = [statistics.fmean(v) for v in zip(*mine)]
    if cost:
        e2e = cost['modes']['e2e']
        row.update(macs=cost['macs'], params=cost['params'], costs_measured=f'{cost["machine"]}, {cost["date"]}',
                   saving={m: e2e['peak_saved_bytes'] / cost['modes'][m]['peak_saved_bytes'] for m in ('gim', 'loco')},
                   time={m: cost['modes'][m]['step_seconds'] / e2e['step_seconds'] for m in ('gim', 'loco')})
    return row


def _pm(pair: dict | None) -> str:
    if not pair:
        return 'not run'
    se = f' +- {pair["se"]:.2f}' if pair['se'] is not None else ' (1 seed)'
    return f'{pair["mean"]:+.2f}{se}, {pair["judgement"]}'


def summary_table(rows: list[dict]) -> list[str]:
    """The cross-family table: per family its member, cost, seeds, paired differences and what LoCo and GIM save."""
    reference = next((r for r in rows if r['family'] == REFERENCE and r.get('macs')), None)
    lines = ['| family | member (tag) | MACs / image (vs ResNet) | params | seeds | LoCo - E2E | LoCo - GIM | '
             'memory saving LoCo / GIM | step time LoCo / GIM |', '|---|---|---|---|---|---|---|---|---|']
    for r in rows:
        seeds = sorted(set.intersection(*(set(r['seeds'].get(arm, ())) for arm in ARMS)))  # every arm ran them
        macs = (f'{r["macs"] / 1e6:.1f} M ({r["macs"] / reference["macs"]:.2f}x)' if r.get('macs') and reference
                else '-')
        params = f'{r["params"] / 1e6:.2f} M' if r.get('params') else '-'
        saving = f'{r["saving"]["loco"]:.2f}x / {r["saving"]["gim"]:.2f}x' if r.get('saving') else '-'
        times = f'{r["time"]["loco"]:.2f}x / {r["time"]["gim"]:.2f}x' if r.get('time') else '-'
        lines.append(f'| {r["family"]} | `{r["tag"]}` | {macs} | {params} | {", ".join(map(str, seeds)) or "-"} | '
                     f'{_pm(r["pairs"].get("LoCo - E2E"))} | {_pm(r["pairs"].get("LoCo - GIM"))} | {saving} | '
                     f'{times} |')
    return lines


def markdown(rows: list[dict]) -> str:
    """The cross-family table, the per-stage readout and how the costs were measured."""
    lines = summary_table(rows)
    lines += ['', 'Per-stage linear top-1 (%, mean over the seeds of each arm), and the readout\'s references: the '
              'same architecture untrained, and the pixels themselves:', '',
              '| family | ' + ' | '.join(ARMS) + ' | random init | pixels |', '|---|' + '---|' * (len(ARMS) + 2)]
    for r in rows:
        stages = [r['per_stage'].get(arm) for arm in ARMS] + [r.get('references', {}).get(k)
                                                               for k in ('random_init', 'pixels')]
        cells = [', '.join(f'{v:.2f}' for v in values) if values else '-' for values in stages]
        lines.append(f'| {r["family"]} | ' + ' | '.join(cells) + ' |')
    lines += anatomy_lines(rows)
    measured = sorted({r['costs_measured'] for r in rows if r.get('costs_measured')})
    lines += ['', 'Differences: last-stage linear top-1, paired per seed, mean +- standard error; LoCo - E2E "held" '
              'when mean +- 2 s.e. lies within +-0.5 pt, LoCo - GIM when it lies above 0. Memory saving: peak saved '
              'activations of one E2E step over the arm\'s (higher saves more); step time: the arm\'s over E2E\'s, '
              'median of 3 steps at the recipe\'s batch' + (f' ({"; ".join(measured)})' if measured else '') + '.']
    return '\n'.join(lines + findings(rows))


def _stage_kinds(kinds: list[dict[str, int]]) -> str:
    """One stage's most frequent class of a kind ('-' for none), or one name when every stage has the same."""
    names = [next(iter(k), '-') for k in kinds]
    return names[0] if len(set(names)) == 1 else ', '.join(names)


def anatomy_lines(rows: list[dict]) -> list[str]:
    """What each family's stages are (``tools/anatomy.py``): maps, share of the multiply-adds, norm, attention."""
    rows = [r for r in rows if r.get('anatomy')]
    if not rows:
        return []
    lines = ['', 'What the units are made of (`tools/anatomy.py`), per stage as the splitter cuts each member at its '
             'input size: the feature map (positions, channels), its layout and the block the conv decoder reads it '
             'with, the share of the multiply-adds, the normalisation, and the self-attention modules:', '',
             '| family | map (channels) | layout: decoder block | MACs share (%) | normalisation | self-attention |',
             '|---|---|---|---|---|---|']
    for r in rows:
        a = r['anatomy']
        maps = ', '.join(f'{g} ({c})' for g, c in zip(a['grids'], a['channels']))
        shares = ', '.join(f'{100 * m / sum(a["macs"]):.0f}' for m in a['macs'])
        kinds = sorted({name for stage in a['attention'] for name in stage})
        attention = ', '.join(str(sum(k.values())) for k in a['attention']) + f' ({", ".join(kinds)})' if kinds else '-'
        reads = _stage_kinds([{f'{layout}: {block}': 1} for layout, block in zip(a['layouts'], a['decoders'])])
        lines.append(f'| {r["family"]} | {maps} | {reads} | {shares} | {_stage_kinds(a["norms"])} | {attention} |')
    return lines


CLAIM_TEXT = {label: f'LoCo {claim}' for label, claim in TABLES[0][1]}  # the trend's words: 'LoCo above GIM', ...


def findings(rows: list[dict]) -> list[str]:
    """What the table says so far, counted from it: per claim the families where it held, did not hold or is
    unresolved (with how many paired seeds), and the families whose every arm reads out below the pixels."""
    lines = []
    for label in MAIN_PAIRS:
        verdicts: dict[str, list[str]] = {}
        for r in rows:
            pair = r['pairs'].get(label)
            if pair:
                verdicts.setdefault(pair['judgement'], []).append(f'{r["family"]} ({len(pair["diffs"])})')
        if verdicts:
            lines.append(f'- {CLAIM_TEXT[label]}: ' + '; '.join(
                f'{verdict} in {", ".join(names)}' for verdict, names in sorted(verdicts.items())) + '.')
    below = [r['family'] for r in rows if r.get('references', {}).get('pixels') and len(r['per_stage']) == len(ARMS)
             and all(stages[-1] < r['references']['pixels'][-1] for stages in r['per_stage'].values())]
    if below:
        lines.append(f'- Every arm below the linear readout of the pixels at the last stage: {", ".join(below)}.')
    untrained = []
    for r in rows:
        init = r.get('references', {}).get('random_init')
        arms = [arm for arm, stages in r['per_stage'].items() if init and stages[-1] < init[-1]]
        if arms:
            untrained.append(f'{r["family"]} ({", ".join(arms)})')
    if untrained:
        lines.append(f'- Arms whose mean reads out below the same network untrained at the last stage: '
                     f'{", ".join(untrained)}.')
    lines += grouped(rows)
    return ['', 'Each claim, family by family (with the number of paired seeds):', '', *lines] if lines else []


def _normalisation(anatomy: dict) -> str:
    """'BatchNorm', 'LayerNorm' or both: the kinds of normalisation layer in a member's stages."""
    kinds = {kind for stage in anatomy['norms'] for name in stage for kind in ('BatchNorm', 'LayerNorm')
             if kind in name}
    return ' and '.join(sorted(kinds)) or 'none'


PROPERTIES = {  # what the families that fail might have in common, read from their anatomy
    'normalisation': _normalisation,
    'self-attention': lambda anatomy: 'with' if any(anatomy['attention']) else 'without',
    'stage balance': lambda anatomy: ('most MACs in the last stage' if anatomy['macs'][-1] > max(anatomy['macs'][:-1])
                                      else 'most MACs in an earlier stage'),
    'stage count': lambda anatomy: f'{len(anatomy["macs"])} stages',
}


def grouped(rows: list[dict]) -> list[str]:
    """Per claim and property (:data:`PROPERTIES`: normalisation, self-attention, stage balance, stage count) with
    more than one value among the families: their mean differences grouped by the property, each group's mean of
    family means and its range. Descriptive: a group is a handful of families."""
    lines = []
    for label in MAIN_PAIRS:
        for prop, kind_of in PROPERTIES.items():
            groups: dict[str, list[tuple[str, float]]] = {}
            for r in rows:
                if label in r['pairs'] and r.get('anatomy'):
                    groups.setdefault(kind_of(r['anatomy']), []).append((r['family'], r['pairs'][label]['mean']))
            if len(groups) < 2:
                continue
            parts = []
            for kind, members in sorted(groups.items()):
                means = [m for _, m in members]
                spread = f', {min(means):+.2f} to {max(means):+.2f}' if len(means) > 1 else ''
                parts.append(f'{kind} {statistics.fmean(means):+.2f} ({len(means)}: '
                             f'{", ".join(f for f, _ in members)}{spread})')
            lines.append(f'- {label} by {prop}, mean of the family means: ' + '; '.join(parts) + '.')
    return lines


def plot(rows: list[dict], path: Path) -> bool:
    """Per family: LoCo - E2E and LoCo - GIM with 2 s.e. bars; beside them LoCo's and GIM's memory saving."""
    plt = pyplot()
    if plt is None:
        return False
    names = [r['family'] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw=dict(width_ratios=[3, 2]))
    for offset, (label, colour) in zip((-0.15, 0.15), (('LoCo - E2E', 'tab:blue'), ('LoCo - GIM', 'tab:orange'))):
        xs = [i + offset for i, r in enumerate(rows) if label in r['pairs']]
        pairs = [r['pairs'][label] for r in rows if label in r['pairs']]
        left.errorbar(xs, [p['mean'] for p in pairs], yerr=[2 * (p['se'] or 0) for p in pairs], fmt='o', capsize=3,
                      color=colour, label=f'{label} (mean +- 2 s.e.)')
    left.axhline(0, color='black', linewidth=0.8)
    left.axhspan(-0.5, 0.5, color='grey', alpha=0.15, label='within 0.5 pt')
    left.set_xticks(range(len(names)), names, rotation=30, ha='right', fontsize=8)
    left.set_ylabel('last-stage linear top-1 difference (pt)')
    left.legend(fontsize=7)
    for offset, (mode, name, colour) in zip((-0.2, 0.2), (('loco', 'LoCo', 'tab:green'), ('gim', 'GIM', 'tab:orange'))):
        right.bar([i + offset for i, r in enumerate(rows) if r.get('saving')],
                  [r['saving'][mode] for r in rows if r.get('saving')], 0.4, color=colour, label=name)
    right.axhline(1, color='black', linewidth=0.8)
    right.set_xticks(range(len(names)), names, rotation=30, ha='right', fontsize=8)
    right.set_ylabel('activation memory saving vs E2E (x)')
    right.legend(fontsize=7)
    fig.suptitle('E2E, GIM and LoCo across timm families (Fashion-MNIST, main job recipe)', fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def report(families: list[str], measure_costs: bool) -> list[dict]:
    """Measure the missing costs (unless told not to), then write the JSON, the figure and the documentation block."""
    path = RESULTS / 'families.json'
    recorded = json.loads(path.read_text()) if path.is_file() else {}
    cost_of = recorded.get('costs', {})
    for family in families:
        if measure_costs and FAMILIES[family] not in cost_of:
            print(f'== {family}: costs', flush=True)
            cost_of[FAMILIES[family]] = costs(FAMILIES[family])
    rows = [dict(summarize(family, cost_of.get(FAMILIES[family])), anatomy=anatomy(FAMILIES[family]))
            for family in FAMILIES]
    path.write_text(json.dumps(dict(costs=cost_of, rows=rows), indent=1) + '\n')
    text = markdown(rows)
    drew = plot(rows, RESULTS / 'families.png')
    figure = '\n\n![E2E, GIM and LoCo across families](figures/benchmarks/results/families.png)' if drew else ''
    replace_block('families', text + figure)
    replace_block('families-summary', '\n'.join(summary_table(rows)))  # the README's copy of the table
    print(text)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--families', nargs='+', choices=list(FAMILIES), default=list(FAMILIES))
    parser.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2])
    parser.add_argument('--report-only', action='store_true', help='train nothing: the table from what is recorded')
    parser.add_argument('--no-costs', action='store_true', help='do not measure missing memory / time / MACs')
    args = parser.parse_args()
    try:
        if not args.report_only:
            run_studies([f for f in args.families if f != REFERENCE], args.seeds)
        report(args.families, measure_costs=not args.no_costs)
    except LocoError as err:  # as the CLI: a pre-emption checkpointed (run the command again), bad input is one line
        print(f'families: {"" if isinstance(err, Preempted) else "error: "}{err}', file=sys.stderr)
        return err.exit_code
    return 0


if __name__ == '__main__':
    sys.exit(main())
