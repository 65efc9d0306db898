"""The accuracy cost of pipelined stage-parallel LoCo on the main job, paired per seed with synchronous LoCo.

Both arms train the main job's recipe (``loco_resnet18_small.simclr_fmnist``: Fashion-MNIST, 3 epochs) on 2 gloo
processes of one thread each (``pipeline: 2``, the measured placement), the same seeds; synchronous LoCo gives one
process's weights (``tests/test_stage_training.py``), pipelined LoCo applies the gradient of the top stage below each
cut one step late (weight stashing: computed with the weights of its forward).
Each run is read out like the study's (the recipe's readout: linear probe with its lr grid, kNN, every stage).
Finished runs are skipped and interrupted ones resumed, so it may span sessions.

Usage: ``.venv/bin/python benchmarks/pipelined_accuracy.py [--seeds 0 1 2] [--runs runs/pipelined-accuracy]
[--reuse synchronous]`` (about 4-6 minutes of training and 1.5 of readout per run on 2 cores). ``--reuse ARM``
takes that arm's results recorded in the committed JSON (with their machine and date) for seeds whose run folder is
absent, instead of training them again: for an arm whose code did not change. Writes
``benchmarks/results/pipelined_accuracy_cpu.json`` and the documentation block ``pipelined-accuracy``
(docs/parallelism.md).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from doc_blocks import cpu_name, write_report  # noqa: E402

TAG = 'loco_resnet18_small.simclr_fmnist'
ARMS = {'synchronous': [], 'pipelined': ['--pipelined']}
RESULTS = ROOT / 'benchmarks' / 'results' / 'pipelined_accuracy_cpu.json'


def _port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def train(run: Path, seed: int, extra: list[str]) -> None:
    """Two gloo processes, one thread each, through accelerate launch (resumes an interrupted run)."""
    from loco_timm.training.checkpoint import latest_checkpoint
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'ACCELERATE_USE_CPU': '1'}
    cmd = [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2',
           '--num_machines', '1', '--main_process_ip', '127.0.0.1', '--main_process_port', str(_port()),
           '--mixed_precision', 'no', '--dynamo_backend', 'no', '-m', 'loco_timm', 'train', '--config', TAG,
           '--pipeline', '2', '--seed', str(seed), '--trackers', 'none', '--out-dir', str(run), *extra]
    if latest_checkpoint(run) is not None:
        cmd.append('--resume')
    subprocess.run(cmd, env=env, check=True)


def finished(run: Path) -> bool:
    from loco_timm.training.checkpoint import latest_checkpoint
    done = run / 'readout.json'
    latest = latest_checkpoint(run)
    return done.is_file() and latest is not None and json.loads(done.read_text())['checkpoint'] == str(latest)


def recorded(arms: list[str]) -> dict[tuple[str, int], dict]:
    """``{(arm, seed): result}`` of ``arms`` in the committed JSON, each with its machine and date."""
    if not arms or not RESULTS.is_file():
        return {}
    old = json.loads(RESULTS.read_text())
    machine = old['machine'].split(',')[0]
    return {(arm, row['seed']): dict(row[arm], machine=row[arm].get('machine', machine),
                                     date=row[arm].get('date', old['date']))
            for row in old['runs'] for arm in arms if arm in row}


def report(runs: Path, seeds: list[int], reused: dict | None = None) -> tuple[dict, str]:
    rows, diffs, reused = [], [], reused or {}
    for seed in seeds:
        row = dict(seed=seed)
        for arm in ARMS:
            run = runs / arm / f'seed-{seed}'
            if not finished(run):
                if (arm, seed) not in reused:
                    break
                row[arm] = reused[(arm, seed)]
                continue
            result = json.loads((run / 'readout.json').read_text())
            summary = json.loads((run / 'train_summary.json').read_text())
            row[arm] = dict(linear=result['rows']['model']['linear'], knn=result['rows']['model']['knn'],
                            train_seconds=summary['wall_seconds'], img_per_s=summary['img_per_s'],
                            placement=json.loads((Path(summary['checkpoint']) / 'progress.json').read_text())
                            .get('placement'), machine=cpu_name(), date=str(date.today()))
        else:
            row['difference'] = round(row['pipelined']['linear'][-1] - row['synchronous']['linear'][-1], 2)
            diffs.append(row['difference'])
            rows.append(row)
    mean = statistics.mean(diffs) if diffs else None
    se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else None
    result = dict(date=str(date.today()), machine=f'{cpu_name()}, 2 processes x 1 thread', recipe=TAG, runs=rows,
                  mean_difference=None if mean is None else round(mean, 2),
                  standard_error=None if se is None else round(se, 2))
    lines = [f'Main job ({TAG}, 3 epochs) on 2 stage groups, {result["machine"]}, {result["date"]}; last-stage '
             f'linear top-1 (%), pipelined minus synchronous per seed:', '',
             '| seed | placement | synchronous | pipelined | difference | train img/s sync / pipelined |',
             '|---|---|---|---|---|---|']
    for row in rows:
        s, p = row['synchronous'], row['pipelined']
        where = s['placement'] if s['placement'] == p['placement'] else f'{s["placement"]} / {p["placement"]}'
        lines.append(f'| {row["seed"]} | {where} | {s["linear"][-1]:.2f} | {p["linear"][-1]:.2f} | '
                     f'{row["difference"]:+.2f} | {s["img_per_s"]:.0f} / {p["img_per_s"]:.0f} |')
    if se is not None:
        lines += ['', f'Mean difference {mean:+.2f} +- {se:.2f} (standard error over {len(diffs)} seeds).']
    where = sorted({(arm, row[arm]['machine'], row[arm]['date']) for row in rows for arm in ARMS})
    if len({(m, d) for _, m, d in where}) > 1:
        lines += ['', 'Runs: ' + '; '.join(f'{arm} on {m} ({d})' for arm, m, d in where) + '.']
    return result, '\n'.join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--runs', default=str(ROOT / 'runs' / 'pipelined-accuracy'))
    parser.add_argument('--reuse', nargs='*', default=[], choices=list(ARMS))
    parser.add_argument('--no-readme', action='store_true')
    args = parser.parse_args()
    reused = recorded(args.reuse)
    from loco_timm.config import ReadoutConfig, from_dict, load_recipe
    from loco_timm.evaluation.readout import readout
    runs = Path(args.runs)
    readout_cfg = from_dict(ReadoutConfig, load_recipe(TAG).get('readout') or {})
    for seed in args.seeds:
        for arm, extra in ARMS.items():
            run = runs / arm / f'seed-{seed}'
            if finished(run) or (not run.exists() and (arm, seed) in reused):
                continue
            print(f'{arm} seed {seed}: training in {run}', flush=True)
            train(run, seed, extra)
            readout(run, readout_cfg, reference_cache=runs / 'references')
    result, text = report(runs, args.seeds, reused)
    write_report(result, RESULTS, 'pipelined-accuracy', text, readme=not args.no_readme)


if __name__ == '__main__':
    main()
