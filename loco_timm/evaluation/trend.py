"""The training-budget trend of a study: the same arms and recipe at several epoch budgets, one study folder per
budget (``loco-timm study --out mine-10ep --set epochs 10 ...``), compared on paired per-seed differences.

For each budget: LoCo - E2E and LoCo - GIM at the last stage, per seed, with mean and standard error (sample std /
sqrt(seeds)), and each of the paper's two main claims judged with an approximate 95 % interval (mean +- 2 standard
errors): *held* when the whole interval satisfies the claim, *did not hold* when none of it does, *unresolved*
otherwise (the seeds cannot tell); a "within 0.5 pt" claim not held adds the side where the interval excludes 0.
How each difference moved from the shortest budget is paired per seed too
(the change of a seed's difference, mean +- standard error, *up* / *down* when mean +- 2 standard errors excludes 0,
else *unresolved*). Also the per-stage linear readout of the arms per budget. ``loco-timm trend`` writes
``trend.json``, ``trend.md`` and (with matplotlib) ``trend.png``.

Where a budget's study also ran the L2 soft-sharing ablation ``loco_l2_1e-4``, the trend holds it beside the three
arms: L2 - E2E (within 0.5 pt?) and L2 - LoCo (above full sharing? At 3 epochs it looked so, the paper's sign is the
other way).
"""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .plots import pyplot

__all__ = ['ARMS', 'budget', 'change', 'judge', 'trend', 'trend_markdown', 'write_trend']

ARMS = ('e2e_mlp', 'loco_conv', 'gim_conv', 'loco_l2_1e-4')
PAIRS = {'LoCo - E2E': ('loco_conv', 'e2e_mlp'), 'LoCo - GIM': ('loco_conv', 'gim_conv'),
         'L2 - E2E': ('loco_l2_1e-4', 'e2e_mlp'), 'L2 - LoCo': ('loco_l2_1e-4', 'loco_conv')}
# each pair's claim: 'within' MARGIN of 0 (comparable), or 'above' 0
CLAIMS = {'LoCo - E2E': 'within', 'LoCo - GIM': 'above', 'L2 - E2E': 'within', 'L2 - LoCo': 'above'}
TABLES = (  # (title, its pairs and claims): the paper's two claims; the L2 ablation where it ran
    ('', (('LoCo - E2E', 'within 0.5 pt of E2E'), ('LoCo - GIM', 'above GIM'))),
    ('L2 soft sharing (arm loco_l2_1e-4: LoCo with each overlapping stage two copies tied by an L2 penalty of 1e-4):',
     (('L2 - E2E', 'within 0.5 pt of E2E'), ('L2 - LoCo', 'above LoCo'))))
MARGIN = 0.5  # the paper's "comparable to E2E": within 0.5 pt


def budget(results: dict) -> float:
    """The epochs a study's runs trained for (its overrides, else its recipe)."""
    return float(results.get('train_overrides', {}).get('epochs', results['recipe']['train']['epochs']))


def judge(pair: str, diffs: list[float]) -> str:
    """``held``, ``did not hold`` or ``unresolved`` for the claim of ``pair`` (:data:`CLAIMS`: within +-0.5 pt, or
    above 0), on the interval mean +- 2 standard errors of the paired differences. A "within" claim that is not held
    says on which side of its reference the interval lies where it excludes 0: ``unresolved (above E2E)``."""
    if len(diffs) < 2:
        return 'unresolved'
    mean = statistics.fmean(diffs)
    half = 2 * statistics.stdev(diffs) / math.sqrt(len(diffs))
    lo, hi = mean - half, mean + half
    if CLAIMS[pair] == 'within':
        verdict = 'held' if -MARGIN <= lo and hi <= MARGIN else 'did not hold' if hi < -MARGIN or lo > MARGIN \
            else 'unresolved'
        if verdict != 'held' and (lo > 0 or hi < 0):  # not comparable, but the seeds tell the side
            verdict += f' ({"above" if lo > 0 else "below"} {pair.split(" - ")[1]})'
        return verdict
    return 'held' if lo > 0 else 'did not hold' if hi < 0 else 'unresolved'


def trend(folders: list[str | Path]) -> dict[str, Any]:
    """The trend over the study folders (each with a ``results.json``), sorted by budget.

    Raises:
        ConfigError: If two folders have the same budget or their recipes differ in anything but the epochs.
    """
    budgets: dict[float, dict] = {}
    recipe = None
    for folder in folders:
        results = json.loads((Path(folder) / 'results.json').read_text())
        epochs = budget(results)
        if epochs in budgets:
            raise ConfigError(f'{folder} and {budgets[epochs]["folder"]} both trained {epochs:g} epochs: give one '
                             f'folder per budget')
        train = {k: v for k, v in results['recipe']['train'].items() if k != 'epochs'}
        others = {k: v for k, v in results.get('train_overrides', {}).items() if k != 'epochs'}
        if recipe is not None and (train, others) != recipe:
            raise ConfigError(f'{folder} has another recipe than the other budgets: only the epochs may differ')
        recipe = (train, others)
        runs = {arm: {r['seed']: r for r in results['runs'] if r['arm'] == arm} for arm in ARMS}
        entry: dict[str, Any] = dict(folder=str(folder), epochs=epochs, pairs={}, per_stage={})
        for label, (a, b) in PAIRS.items():
            seeds = sorted(set(runs[a]) & set(runs[b]))
            diffs = [runs[a][s]['linear'][-1] - runs[b][s]['linear'][-1] for s in seeds]
            if diffs:
                sem = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else None
                entry['pairs'][label] = dict(seeds=seeds, diffs=[round(d, 2) for d in diffs],
                                             mean=round(statistics.fmean(diffs), 3),
                                             sem=None if sem is None else round(sem, 3), claim=judge(label, diffs))
        for arm in ARMS:
            if runs[arm]:
                stages = zip(*(r['linear'] for r in runs[arm].values()))
                entry['per_stage'][arm] = dict(seeds=sorted(runs[arm]),
                                               linear=[round(statistics.fmean(s), 2) for s in stages])
        budgets[epochs] = entry
    ordered = [budgets[e] for e in sorted(budgets)]
    for entry in ordered[1:]:
        for label, pair in entry['pairs'].items():
            if label in ordered[0]['pairs']:
                pair['change'] = change(ordered[0]['pairs'][label], pair, ordered[0]['epochs'])
    return dict(budgets=ordered)


def change(before: dict, after: dict, epochs: float) -> dict:
    """How a paired difference moved between two budgets, on the seeds both have: each seed's difference at the
    later budget minus the same seed's at ``epochs``, with mean, standard error and the direction (``up``, ``down``,
    or ``unresolved`` when mean +- 2 standard errors includes 0)."""
    was = dict(zip(before['seeds'], before['diffs']))
    deltas = [d - was[s] for s, d in zip(after['seeds'], after['diffs']) if s in was]
    seeds = [s for s in after['seeds'] if s in was]
    if not deltas:
        return dict(since=epochs, seeds=[], deltas=[], mean=None, sem=None, direction='unresolved')
    mean = statistics.fmean(deltas)
    sem = statistics.stdev(deltas) / math.sqrt(len(deltas)) if len(deltas) > 1 else None
    direction = 'unresolved' if sem is None or abs(mean) <= 2 * sem else 'up' if mean > 0 else 'down'
    return dict(since=epochs, seeds=seeds, deltas=[round(d, 2) for d in deltas], mean=round(mean, 3),
                sem=None if sem is None else round(sem, 3), direction=direction)


def _epochs(value: float) -> str:
    return f'{value:g}'


def _pairs_table(report: dict, table: tuple) -> list[str]:
    """Rows per budget: the seeds, and per pair of ``table`` the mean +- s.e. and the claim's judgement."""
    head = ' | '.join(f'{label} (mean +- s.e.) | {claim}' for label, claim in table)
    lines = [f'| epochs | seeds | {head} |', '|---:|---|' + '---:|---|' * len(table)]
    for entry in report['budgets']:
        cells = []
        for label, _ in table:
            pair = entry['pairs'].get(label)
            if pair is None:
                cells += ['-', '-']
                continue
            sem = f' +- {pair["sem"]:.2f}' if pair['sem'] is not None else ' (1 seed)'
            cells += [f'{pair["mean"]:+.2f}{sem}', pair['claim']]
        seeds = next((entry['pairs'][label]['seeds'] for label, _ in table if label in entry['pairs']), [])
        lines.append(f'| {_epochs(entry["epochs"])} | {", ".join(map(str, seeds)) or "-"} | ' + ' | '.join(cells)
                     + ' |')
    return lines


def trend_markdown(report: dict) -> str:
    """Tables of the paired differences and claims, and of the per-stage readout, per budget."""
    lines: list[str] = []
    for title, table in TABLES:
        if any(label in entry['pairs'] for entry in report['budgets'] for label, _ in table):
            lines += (['', title, ''] if title else []) + _pairs_table(report, table)
    moved = [(entry, label, pair['change']) for entry in report['budgets'] for label, pair in entry['pairs'].items()
             if pair.get('change', {}).get('seeds')]
    if moved:
        lines += ['', 'How each difference moved from the shortest budget (each seed\'s difference minus its own '
                      'at that budget):', '', '| epochs | difference | since | seeds | change (mean +- s.e.) | moved |',
                  '|---:|---|---:|---|---:|---|']
        for entry, label, c in moved:
            sem = f' +- {c["sem"]:.2f}' if c['sem'] is not None else ' (1 seed)'
            lines.append(f'| {_epochs(entry["epochs"])} | {label} | {_epochs(c["since"])} | '
                         f'{", ".join(map(str, c["seeds"]))} | {c["mean"]:+.2f}{sem} | {c["direction"]} |')
    lines += ['', 'Per-stage linear top-1 (mean over seeds):', '', '| epochs | arm | seeds | per stage |',
              '|---:|---|---|---|']
    for entry in report['budgets']:
        for arm, row in entry['per_stage'].items():
            lines.append(f'| {_epochs(entry["epochs"])} | {arm} | {len(row["seeds"])} | '
                         f'{", ".join(f"{v:.2f}" for v in row["linear"])} |')
    return '\n'.join(lines) + '\n'


def _plot(report: dict, path: Path) -> bool:
    """The paired differences per budget (each seed a dot, mean +- 2 s.e.) and the per-stage readout of the three
    arms per budget; False where matplotlib is not installed."""
    plt = pyplot()
    if plt is None:
        return False
    from matplotlib.ticker import NullFormatter  # optional dependency: installed, as pyplot() found
    epochs = [entry['epochs'] for entry in report['budgets']]
    pairs = [label for label in PAIRS if any(label in entry['pairs'] for entry in report['budgets'])]
    fig, axes = plt.subplots(1, len(pairs) + 1, figsize=(5 * (len(pairs) + 1), 3.6), squeeze=False)
    for ax, label in zip(axes[0], pairs):
        for entry in report['budgets']:
            pair = entry['pairs'].get(label)
            if pair is None:
                continue
            x = entry['epochs']
            ax.scatter([x] * len(pair['diffs']), pair['diffs'], color='tab:blue', alpha=0.6, s=18)
            ax.errorbar([x], [pair['mean']], yerr=[2 * (pair['sem'] or 0)], color='black', capsize=4, fmt='o')
        ax.axhline(0, color='gray', lw=0.8)
        if CLAIMS[label] == 'within':
            for y in (-MARGIN, MARGIN):
                ax.axhline(y, color='gray', lw=0.8, ls='--')
        ax.set_xscale('log')
        ax.set_xticks(epochs, [_epochs(e) for e in epochs])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel('epochs')
        ax.set_ylabel(f'{label}, last stage (pt)')
        ax.set_title(f'{label}: seeds (dots), mean +- 2 s.e.', fontsize=10)
    ax = axes[0][-1]
    colors = dict(zip(ARMS, ('tab:gray', 'tab:blue', 'tab:orange', 'tab:green')))
    styles = ['--', '-', ':', '-.']
    for i, entry in enumerate(report['budgets']):
        for arm, row in entry['per_stage'].items():
            ax.plot(range(1, len(row['linear']) + 1), row['linear'], marker='o', ms=3, color=colors[arm],
                    ls=styles[i % len(styles)], label=f'{arm}, {_epochs(entry["epochs"])} ep')
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel('stage')
    ax.set_ylabel('linear top-1 (%), mean over seeds')
    ax.set_title('per-stage readout per budget', fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_trend(folders: list[str | Path], out: str | Path) -> dict:
    """Write ``trend.json``, ``trend.md`` and (with matplotlib) ``trend.png`` of the study folders into ``out``; the
    report's ``plot`` is the figure's path, or None."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = trend(folders)
    (out / 'trend.json').write_text(json.dumps(report, indent=2) + '\n')
    (out / 'trend.md').write_text(trend_markdown(report))
    report['plot'] = str(out / 'trend.png') if _plot(report, out / 'trend.png') else None
    return report
