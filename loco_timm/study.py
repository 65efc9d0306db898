"""The paper's comparison at small scale: ``loco-timm study``.

Six arms share one recipe (the main job's tag: backbone, budget, optimiser, augmentations, readout) and differ only
in mode and decoder: E2E SimCLR with the mlp decoder and with the conv decoder (the paper's control), GIM with mlp and
conv decoders, LoCo with conv and mlp decoders; each for several seeds. Every run is trained and read out like the
main job, in ``OUT/<arm>/seed-<s>``; finished runs are skipped and interrupted ones resumed, so a study may span
sessions. After every run the command rewrites ``OUT/results.json`` (all runs), ``OUT/results.md`` (mean +- std over
seeds, paired per-seed differences, the paper's claims checked), ``OUT/readout.png`` (per-stage linear top-1) and
``OUT/losses.png`` (per-unit training losses). The reference rows (raw pixels; the random-init encoder, the same for
every arm of a seed) are read out once and kept in ``OUT/references``.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from .config import ReadoutConfig, TrainConfig, from_dict, load_recipe

__all__ = ['ARMS', 'run_study', 'summarize', 'CLAIMS']

ARMS = {  # name: (mode, decoder)
    'e2e_mlp': ('e2e', 'mlp'), 'e2e_conv': ('e2e', 'conv'), 'gim_mlp': ('gim', 'mlp'), 'gim_conv': ('gim', 'conv'),
    'loco_conv': ('loco', 'conv'), 'loco_mlp': ('loco', 'mlp'),
}
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
    for name in ARMS:
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
                  hours=sum(r['train_seconds'] + r['readout_seconds'] for r in timed) / 3600, runs=len(timed)) \
        if timed else None
    return dict(arms=arms, pairs=pairs, claims=claims, timing=timing)


def results_markdown(summary: dict, seeds: int) -> str:
    runs = sum(len(arm['seeds']) for arm in summary['arms'].values())
    planned = len(ARMS) * max(seeds, 3)
    lines = [f'{runs} of {planned} runs ({len(ARMS)} arms x {max(seeds, 3)} seeds)' +
             (': **partial**, means over the seeds run so far.' if runs < planned else '.'), '',
             '| arm | mode | decoder | seeds | last-stage linear top-1 | last-stage kNN top-1 | linear top-1 per stage '
             '(mean) |', '|---|---|---|---|---|---|---|']
    for name, arm in summary['arms'].items():
        mode, decoder = ARMS[name]
        lines.append(f'| {name} | {mode} | {decoder} | {", ".join(map(str, arm["seeds"]))} | {_fmt(arm["linear"])} | '
                     f'{_fmt(arm["knn"])} | {", ".join(f"{v:.2f}" for v in arm["per_stage"])} |')
    lines += ['', '| paired difference (same seed) | per seed | mean +- std |', '|---|---|---|']
    for label, pair in summary['pairs'].items():
        lines.append(f'| {label} | {", ".join(f"{d:+.2f}" for d in pair["diff"])} | {_fmt(pair["diff"])} |')
    lines += ['', 'Claims of the paper, checked on these runs (last-stage linear top-1, mean of the paired per-seed '
              'differences above):', '']
    for claim in CLAIMS:
        held = summary['claims'].get(claim)
        lines.append(f'- {claim}: ' + ('not measured yet' if held is None else 'held' if held else '**did not hold**'))
    timing = summary.get('timing')
    if timing:
        lines += ['', f'Time per run on the machine that ran them: training {timing["train"][0]:.0f}-'
                      f'{timing["train"][1]:.0f} s, readout {timing["readout"][0]:.0f}-{timing["readout"][1]:.0f} s; '
                      f'{timing["hours"]:.1f} hours for {timing["runs"]} runs.']
    return '\n'.join(lines)


def _plots(runs: list[dict], summary: dict, out: Path) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = {'e2e': 'tab:blue', 'gim': 'tab:orange', 'loco': 'tab:green'}
    for name, arm in summary['arms'].items():
        mode, decoder = ARMS[name]
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
    fig, axes = plt.subplots(1, len(ARMS), figsize=(3 * len(ARMS), 3), sharey=True)
    for ax, name in zip(axes, ARMS):
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


def run_study(out: str | Path, config: str, seeds: list[int], arms: list[str] | None = None,
              train_overrides: dict | None = None, readout_overrides: dict | None = None, log=print) -> dict:
    """Train and read out every (arm, seed) not finished yet, then rewrite the study's results and plots."""
    from .checkpoint import latest_checkpoint
    from .readout import readout
    from .train import train
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    recipe = load_recipe(config)
    arms = arms or list(ARMS)
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        raise ValueError(f'unknown arm(s) {", ".join(unknown)}: valid arms are {", ".join(ARMS)}')
    readout_cfg = from_dict(ReadoutConfig, dict(recipe.get('readout') or {}, **(readout_overrides or {})))
    for name in arms:
        mode, decoder = ARMS[name]
        for seed in seeds:
            run_dir = out / name / f'seed-{seed}'
            cfg = from_dict(TrainConfig, dict(recipe['train'], **(train_overrides or {}), mode=mode, decoder=decoder,
                                               seed=seed, out_dir=str(run_dir)))
            done = run_dir / 'readout.json'
            latest = latest_checkpoint(run_dir)
            finished = done.is_file() and latest is not None and json.loads(done.read_text())['checkpoint'] == str(
                latest) and (run_dir / 'train_summary.json').is_file()
            if finished:
                log(f'{name} seed {seed}: done, skipped')
                continue
            log(f'{name} seed {seed}: training ({mode}, {decoder} decoder) in {run_dir}')
            train(cfg, resume=latest is not None)
            readout(run_dir, readout_cfg, log=log, reference_cache=out / 'references')
            _write_results(out, config, seeds, recipe, train_overrides, readout_overrides)
    return _write_results(out, config, seeds, recipe, train_overrides, readout_overrides)


def _write_results(out: Path, config: str, seeds: list[int], recipe: dict, train_overrides: dict | None,
                   readout_overrides: dict | None) -> dict:
    runs = []
    for name in ARMS:
        for run_dir in sorted((out / name).glob('seed-*')):
            if not (run_dir / 'readout.json').is_file():
                continue
            result = json.loads((run_dir / 'readout.json').read_text())
            summary = json.loads((run_dir / 'train_summary.json').read_text())
            runs.append(dict(arm=name, seed=int(run_dir.name.split('-')[1]), linear=result['rows']['model']['linear'],
                             knn=result['rows']['model']['knn'], linear_lr=result['rows']['model'].get('lr'),
                             references={k: v['linear'] for k, v in result['rows'].items() if k != 'model'},
                             train_seconds=summary['wall_seconds'], readout_seconds=result.get('seconds'),
                             steps=summary['steps'],
                             losses=_loss_curves(run_dir)))
    summary = summarize(runs)
    results = dict(config=config, recipe=recipe, train_overrides=train_overrides or {},
                   readout_overrides=readout_overrides or {}, seeds=seeds, summary=summary, runs=runs)
    (out / 'results.json').write_text(json.dumps(results, indent=1))
    (out / 'results.md').write_text(results_markdown(summary, len(seeds)) + '\n')
    if runs:
        _plots(runs, summary, out)
    return results
