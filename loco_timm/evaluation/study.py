"""The paper's comparison at small scale: ``loco-timm study``.

Six arms share one recipe (the main job's tag: backbone, budget, optimiser, augmentations, readout) and differ only in
mode and decoder: E2E SimCLR with the mlp decoder and with the conv decoder (the paper's control), GIM with mlp and conv
decoders, LoCo with conv and mlp decoders; each for several seeds. The paper's ablations are further arms
(``ABLATIONS``: sharing strategies and decoder depths), each compared with the arm it changes. Every run is trained and
read out like the main job, in ``OUT/<arm>/seed-<s>``; finished runs are skipped and interrupted ones resumed, so a
study may span sessions, and runs recorded in ``OUT/results.json`` (committed) count as finished, so it may span
machines. After every run the command rewrites ``OUT/results.json`` (all runs), ``OUT/results.md`` (mean +- std over
seeds, paired per-seed differences, the paper's claims checked), ``OUT/readout.png`` (per-stage linear top-1) and
``OUT/losses.png`` (per-unit training losses). The reference rows (raw pixels; the random-init encoder, the same for
every arm of a seed) are read out once and kept in ``OUT/references``.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import yaml

from ..config import ReadoutConfig, TrainConfig, from_dict, load_recipe
from ..errors import ConfigError
from ..files import write_text_atomic
from ..training.checkpoint import latest_checkpoint
from ..training.train import train
from .plots import pyplot
from .readout import readout

__all__ = ['ARMS', 'ABLATIONS', 'arm_overrides', 'expand_arms', 'run_study', 'summarize', 'CLAIMS']

ARMS = {  # name: (mode, decoder)
    'e2e_mlp': ('e2e', 'mlp'), 'e2e_conv': ('e2e', 'conv'), 'gim_mlp': ('gim', 'mlp'), 'gim_conv': ('gim', 'conv'),
    'loco_conv': ('loco', 'conv'), 'loco_mlp': ('loco', 'mlp'),
}


def _paper_ablations() -> dict[str, tuple[dict, str, str, float, float]]:
    """The paper's ablations as arms (``paper_ablations.yaml`` beside this module): name -> (train keys, the arm it
    is compared with, the paper's row, the paper's value for it, the paper's value for that arm)."""
    rows = yaml.safe_load((Path(__file__).with_name('paper_ablations.yaml')).read_text())
    return {name: (dict(row['train']), row['compare'], row['label'], float(row['paper']), float(row['paper_compare']))
            for name, row in rows.items()}


ABLATIONS = _paper_ablations()


def arm_overrides(name: str) -> dict:
    """The train keys an arm sets."""
    if name in ARMS:
        return dict(mode=ARMS[name][0], decoder=ARMS[name][1])
    return dict(ABLATIONS[name][0])


def expand_arms(arms: list[str] | None) -> list[str]:
    """Arm names, with the groups ``main`` (the six arms, the default) and ``ablations`` (every ablation arm and
    the arms they are compared with) expanded, in order and without repeats.

    Raises:
        ValueError: For a name that is no arm or group.
    """
    names = []
    for name in arms or ['main']:
        if name == 'main':
            names += list(ARMS)
        elif name == 'ablations':
            names += [ABLATIONS[a][1] for a in ABLATIONS] + list(ABLATIONS)
        elif name in ARMS or name in ABLATIONS:
            names.append(name)
        else:
            raise ConfigError(f'unknown arm {name}: valid arms are {", ".join(list(ARMS) + list(ABLATIONS))} and the '
                             f'groups main, ablations')
    return list(dict.fromkeys(names))
PAIRS = {'LoCo - E2E': ('loco_conv', 'e2e_mlp'), 'LoCo - GIM': ('loco_conv', 'gim_conv'),
         'GIM: conv - mlp decoder': ('gim_conv', 'gim_mlp'), 'E2E: conv - mlp decoder': ('e2e_conv', 'e2e_mlp')}
CLAIMS = ('LoCo (conv) is within 0.5 pt of E2E (mlp) at the last stage',
          'LoCo (conv) is above GIM (conv) at the last stage',
          'the conv decoder helps GIM (gim_conv > gim_mlp)',
          'the conv decoder does not help E2E (e2e_conv <= e2e_mlp + 0.5 pt)')


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _fmt(values: list[float]) -> str:
    mean, std = _mean_std(values)
    return f'{mean:.2f} +- {std:.2f}' if len(values) > 1 else f'{mean:.2f} (1 seed)'


def summarize(runs: list[dict]) -> dict[str, Any]:
    """Per arm: last-stage linear/kNN and per-stage linear, mean and std over seeds; paired differences; claims."""
    arms: dict[str, dict] = {}
    for name in list(ARMS) + list(ABLATIONS):
        mine = sorted((r for r in runs if r['arm'] == name), key=lambda r: r['seed'])
        if not mine:
            continue
        stages = range(len(mine[0]['linear']))
        arms[name] = dict(seeds=[r['seed'] for r in mine], linear=[r['linear'][-1] for r in mine],
                          knn=[r['knn'][-1] for r in mine],
                          per_stage=[statistics.fmean(r['linear'][k] for r in mine) for k in stages])
    pairs = {}
    for label, (a, b) in PAIRS.items():
        if a in arms and b in arms:
            common = sorted(set(arms[a]['seeds']) & set(arms[b]['seeds']))
            diff = [arms[a]['linear'][arms[a]['seeds'].index(s)] - arms[b]['linear'][arms[b]['seeds'].index(s)]
                    for s in common]
            if diff:
                pairs[label] = dict(seeds=common, diff=diff)
    # claims from paired differences over the seeds both arms have, so a partial study compares like with like
    paired = {(a, b): statistics.fmean(pairs[label]['diff']) for label, (a, b) in PAIRS.items() if label in pairs}
    checks = {CLAIMS[0]: (('loco_conv', 'e2e_mlp'), lambda d: abs(d) <= 0.5),
              CLAIMS[1]: (('loco_conv', 'gim_conv'), lambda d: d > 0),
              CLAIMS[2]: (('gim_conv', 'gim_mlp'), lambda d: d > 0),
              CLAIMS[3]: (('e2e_conv', 'e2e_mlp'), lambda d: d <= 0.5)}
    claims = {claim: test(paired[arms_]) for claim, (arms_, test) in checks.items() if arms_ in paired}
    timed = [r for r in runs if r.get('train_seconds') is not None and r.get('readout_seconds') is not None]
    timing = dict(train=[min(r['train_seconds'] for r in timed), max(r['train_seconds'] for r in timed)],
                  readout=[min(r['readout_seconds'] for r in timed), max(r['readout_seconds'] for r in timed)],
                  hours=sum(r['train_seconds'] + r['readout_seconds'] for r in timed) / 3600, runs=len(timed),
                  machines=sorted({r['machine'] for r in timed if r.get('machine')})) if timed else None
    ablations = {}
    for name, (_, reference, label, paper, paper_reference) in ABLATIONS.items():
        if name in arms and reference in arms:
            common = sorted(set(arms[name]['seeds']) & set(arms[reference]['seeds']))
            diff = [arms[name]['linear'][arms[name]['seeds'].index(s)] -
                    arms[reference]['linear'][arms[reference]['seeds'].index(s)] for s in common]
            if diff:
                ablations[name] = dict(reference=reference, label=label, seeds=common, diff=diff,
                                       paper_diff=round(paper - paper_reference, 2))
    return dict(arms=arms, pairs=pairs, claims=claims, timing=timing, ablations=ablations)


def results_markdown(summary: dict, seeds: int) -> str:
    runs = sum(len(arm['seeds']) for name, arm in summary['arms'].items() if name in ARMS)
    planned = len(ARMS) * max(seeds, 3)
    ablation = {name: arm for name, arm in summary['arms'].items() if name in ABLATIONS}
    header = (f'{runs} of {planned} runs of the main arms ({len(ARMS)} arms x {max(seeds, 3)} seeds): **partial**, '
              f'means over the seeds run so far.' if runs < planned else
              f'{runs} runs of the main arms ({len(ARMS)} arms; the seeds of each in the table).')
    if ablation:
        done = sum(len(arm['seeds']) for arm in ablation.values())
        header += (f' Ablation arms: {done} runs of {len(ablation)} of the {len(ABLATIONS)} arms so far (2 seeds each '
                   f'planned: **partial**).' if done < 2 * len(ABLATIONS) else
                   f' Ablation arms: {done} runs ({len(ABLATIONS)} arms).')
    lines = [header, '',
             '| arm | mode | decoder | seeds | last-stage linear top-1 | last-stage kNN top-1 | linear top-1 per stage '
             '(mean) |', '|---|---|---|---|---|---|---|']
    for name, arm in summary['arms'].items():
        mode, decoder = arm_overrides(name)['mode'], arm_overrides(name)['decoder']
        lines.append(f'| {name} | {mode} | {decoder} | {", ".join(map(str, arm["seeds"]))} | {_fmt(arm["linear"])} | '
                     f'{_fmt(arm["knn"])} | {", ".join(f"{v:.2f}" for v in arm["per_stage"])} |')
    lines += ['', '| paired difference (same seed) | per seed | mean +- std |', '|---|---|---|']
    for label, pair in summary['pairs'].items():
        lines.append(f'| {label} | {", ".join(f"{d:+.2f}" for d in pair["diff"])} | {_fmt(pair["diff"])} |')
    if summary.get('ablations'):
        lines += ['', 'Ablations: each arm minus the arm it changes, paired per seed (last-stage linear top-1), next '
                      'to the same difference in the paper (ResNet-50, ImageNet, 100 epochs):', '',
                  '| ablation (the paper\'s row) | difference | per seed | mean +- std | paper | same sign |',
                  '|---|---|---|---|---|---|']
        for name, row in summary['ablations'].items():
            mean = statistics.fmean(row['diff'])
            same = (mean > 0) == (row['paper_diff'] > 0)
            lines.append(f'| {row["label"]} | {name} - {row["reference"]} | '
                         f'{", ".join(f"{d:+.2f}" for d in row["diff"])} | {_fmt(row["diff"])} | '
                         f'{row["paper_diff"]:+.1f} | {"yes" if same else "**no**"} |')
    lines += ['', 'Claims of the paper, checked on these runs (last-stage linear top-1, mean of the paired per-seed '
              'differences above):', '']
    for claim in CLAIMS:
        held = summary['claims'].get(claim)
        lines.append(f'- {claim}: ' + ('not measured yet' if held is None else 'held' if held else '**did not hold**'))
    timing = summary.get('timing')
    if timing:
        machines = timing.get('machines')
        where = 'the machines that ran them' + (f' ({", ".join(machines)} where recorded)' if machines else '')
        lines += ['', f'Time per run on {where}: training {timing["train"][0]:.0f}-'
                      f'{timing["train"][1]:.0f} s, readout {timing["readout"][0]:.0f}-{timing["readout"][1]:.0f} s; '
                      f'{timing["hours"]:.1f} hours for {timing["runs"]} runs.']
    return '\n'.join(lines)


def _plots(runs: list[dict], summary: dict, out: Path) -> None:
    """``readout.png`` (per-stage linear top-1 per arm) and ``losses.png`` (training curves), where matplotlib is
    installed."""
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = {'e2e': 'tab:blue', 'gim': 'tab:orange', 'loco': 'tab:green'}
    for name, arm in summary['arms'].items():
        mode, decoder = arm_overrides(name)['mode'], arm_overrides(name)['decoder']
        per_seed = [r['linear'] for r in runs if r['arm'] == name]
        stds = [_mean_std([values[k] for values in per_seed])[1] for k in range(len(arm['per_stage']))]
        ax.errorbar(range(1, len(arm['per_stage']) + 1), arm['per_stage'], yerr=stds, marker='o', capsize=3,
                    color=colours[mode], linestyle='-' if decoder == 'conv' else '--',
                    label=f'{name} ({len(per_seed)} seed{"s" if len(per_seed) > 1 else ""})')
    random_init = [r['references']['random_init'] for r in runs if 'random_init' in r.get('references', {})]
    if random_init:
        ax.plot(range(1, len(random_init[0]) + 1), [statistics.fmean(v) for v in zip(*random_init)], marker='x',
                color='grey', linestyle=':', label='random-init encoder')
    pixels = [r['references']['pixels'][-1] for r in runs if 'pixels' in r.get('references', {})]
    if pixels:
        ax.axhline(statistics.fmean(pixels), color='black', linestyle=':', linewidth=1, label='raw pixels')
    ax.set_xticks(range(1, len(next(iter(summary['arms'].values()))['per_stage']) + 1))
    ax.set_xlabel('stage')
    ax.set_ylabel('linear top-1 (%), mean ± std over seeds')
    ax.set_title('Linear readout per stage (solid: conv decoder, dashed: mlp)', fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / 'readout.png', dpi=120)
    plt.close(fig)
    names = list(summary['arms'])
    fig, axes = plt.subplots(1, len(names), figsize=(3 * len(names), 3), sharey=True, squeeze=False)
    axes = axes[0]
    for ax, name in zip(axes, names):
        for run in (r for r in runs if r['arm'] == name):
            for unit, curve in run.get('losses', {}).items():
                first = run['seed'] == min(r['seed'] for r in runs if r['arm'] == name)
                ax.plot(curve['step'], curve['loss'], linewidth=0.8, color=f'C{int(unit)}', alpha=1.0 if first else
                        0.5, label=f'unit {int(unit) + 1}' if first else None)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel('step')
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    axes[0].set_ylabel('training loss (NT-Xent)')
    fig.tight_layout()
    fig.savefig(out / 'losses.png', dpi=120)
    plt.close(fig)


def _loss_curves(run_dir: Path) -> dict[str, dict[str, list]]:
    curves: dict[str, dict[str, list]] = {}
    path = run_dir / 'losses.jsonl'
    if path.is_file():
        for line in path.read_text().splitlines():
            row = json.loads(line)
            for key, value in row.items():
                if key.startswith('loss/unit'):
                    curve = curves.setdefault(key[len('loss/unit'):], dict(step=[], loss=[]))
                    curve['step'].append(row['step'])
                    curve['loss'].append(value)
    return curves


def run_study(out: str | Path, config: str, seeds: list[int], arms: list[str] | None = None, *,
              train_overrides: dict | None = None, readout_overrides: dict | None = None, log=print) -> dict:
    """Train and read out every (arm, seed) not finished yet, then rewrite the study's results and plots."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    recipe = load_recipe(config)
    arms = expand_arms(arms)
    readout_cfg = from_dict(ReadoutConfig, dict(recipe.get('readout') or {}, **(readout_overrides or {})))
    recorded = _recorded_runs(out, recipe, train_overrides, readout_overrides)
    for seed in seeds:  # whole seeds first: a study cut short still has paired comparisons
        for name in arms:
            keys = arm_overrides(name)
            mode, decoder = keys['mode'], keys['decoder']
            run_dir = out / name / f'seed-{seed}'
            cfg = from_dict(TrainConfig, dict(recipe['train'], **(train_overrides or {}), **keys, seed=seed,
                                               out_dir=str(run_dir)))
            done = run_dir / 'readout.json'
            latest = latest_checkpoint(run_dir)
            finished = done.is_file() and latest is not None and json.loads(done.read_text())['checkpoint'] == str(
                latest) and (run_dir / 'train_summary.json').is_file()
            if finished:
                log(f'{name} seed {seed}: done, skipped')
                continue
            if (name, seed) in recorded:  # run on another machine: its folder is not here, its result is
                log(f'{name} seed {seed}: recorded in {out / "results.json"}, skipped')
                continue
            log(f'{name} seed {seed}: training ({mode}, {decoder} decoder) in {run_dir}')
            train(cfg, resume=latest is not None)
            readout(run_dir, readout_cfg, log=log, reference_cache=out / 'references')
            _write_results(out, config, seeds, recipe, train_overrides, readout_overrides)
    return _write_results(out, config, seeds, recipe, train_overrides, readout_overrides)


def _same_settings(results: dict, recipe: dict, train_overrides: dict | None, readout_overrides: dict | None) -> bool:
    def plain(value):
        return json.loads(json.dumps(value))
    old, new = results.get('recipe') or {}, plain(recipe)
    return (all(old.get(k) == new.get(k) for k in ('train', 'readout')) and
            results.get('train_overrides', {}) == plain(train_overrides or {}) and
            results.get('readout_overrides', {}) == plain(readout_overrides or {}))


def _recorded_runs(out: Path, recipe: dict, train_overrides: dict | None,
                   readout_overrides: dict | None) -> dict[tuple[str, int], dict]:
    """(arm, seed) -> run of the study's ``results.json`` (committed, so a study spans machines).

    Raises:
        ValueError: If the file records runs of another recipe or other overrides.
    """
    path = out / 'results.json'
    if not path.is_file():
        return {}
    results = json.loads(path.read_text())
    if results.get('runs') and not _same_settings(results, recipe, train_overrides, readout_overrides):
        raise ConfigError(f'{path} records runs of another recipe or other --set / --readout-set values: use the '
                         f'same ones, or another --out')
    return {(r['arm'], r['seed']): r for r in results.get('runs', [])}


def _write_results(out: Path, config: str, seeds: list[int], recipe: dict, train_overrides: dict | None,
                   readout_overrides: dict | None) -> dict:
    recorded = _recorded_runs(out, recipe, train_overrides, readout_overrides)
    runs = []
    for name in list(ARMS) + list(ABLATIONS):
        for run_dir in sorted((out / name).glob('seed-*')):
            if not (run_dir / 'readout.json').is_file():
                continue
            result = json.loads((run_dir / 'readout.json').read_text())
            summary = json.loads((run_dir / 'train_summary.json').read_text())
            runs.append(dict(arm=name, seed=int(run_dir.name.split('-')[1]), linear=result['rows']['model']['linear'],
                             knn=result['rows']['model']['knn'], linear_lr=result['rows']['model'].get('lr'),
                             references={k: v['linear'] for k, v in result['rows'].items() if k != 'model'},
                             train_seconds=summary['wall_seconds'], readout_seconds=result.get('seconds'),
                             steps=summary['steps'], machine=summary.get('machine'),
                             losses=_loss_curves(run_dir)))
    here = {(r['arm'], r['seed']) for r in runs}
    runs += [r for key, r in recorded.items() if key not in here]  # runs whose folders are on another machine
    runs.sort(key=lambda r: ((list(ARMS) + list(ABLATIONS)).index(r['arm']), r['seed']))
    summary = summarize(runs)
    results = dict(config=config, recipe=recipe, train_overrides=train_overrides or {},
                   readout_overrides=readout_overrides or {}, seeds=seeds, summary=summary, runs=runs)
    write_text_atomic(out / 'results.json', json.dumps(results, indent=1))  # the study's record: never half-written
    write_text_atomic(out / 'results.md', results_markdown(summary, len(seeds)) + '\n')
    if runs:
        _plots(runs, summary, out)
    return results
