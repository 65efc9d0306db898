"""GPU check of the schedule: E2E, GIM and LoCo on ResNet-50 at 224 px with bf16 autocast and channels_last.

Reports img/s (median of timed steps after warm-up) and the step's peak memory above what was allocated before it
(``torch.cuda.max_memory_allocated``), each also as a ratio to E2E. Runs in a few minutes on one GPU:

    python benchmarks/gpu.py --batch 128 --steps 10 --out benchmarks/results/schedule_gpu.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import timm
import torch

import loco_timm  # noqa: F401
from loco_timm import LocalLearner

CONFIGS = [('e2e', 'mlp', False), ('gim', 'conv', False), ('loco', 'conv', False), ('loco', 'conv', True),
           ('gim', 'mlp', False), ('loco', 'mlp', False)]


def run(mode: str, decoder: str, recompute: bool, batch: int, steps: int) -> dict:
    torch.manual_seed(0)
    learner = LocalLearner(timm.create_model('resnet50'), mode=mode, decoder=decoder, input_size=(3, 224, 224),
                           recompute=recompute).cuda().to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(learner.parameters(), lr=0.01, momentum=0.9)
    views = [torch.randn(batch, 3, 224, 224, device='cuda').contiguous(memory_format=torch.channels_last)
             for _ in range(2)]
    times = []
    for i in range(steps + 3):
        optimizer.zero_grad(set_to_none=False)  # gradients stay allocated: only activations change between modes
        torch.cuda.synchronize()
        if i == 2:
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        start = time.perf_counter()
        with torch.autocast('cuda', dtype=torch.bfloat16):
            learner.step(*views)
        optimizer.step()
        torch.cuda.synchronize()
        if i == 2:
            peak = torch.cuda.max_memory_allocated() - before
        if i >= 3:
            times.append(time.perf_counter() - start)
    del learner, optimizer, views
    torch.cuda.empty_cache()
    step = statistics.median(times)
    return dict(mode=mode, decoder=decoder, recompute=recompute, step_seconds=step, img_per_s=round(batch / step, 1),
                peak_bytes=peak)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--batch', type=int, default=128, help='images per view')
    parser.add_argument('--steps', type=int, default=10)
    parser.add_argument('--out', default='benchmarks/results/schedule_gpu.json')
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit('benchmarks/gpu.py needs a CUDA GPU; benchmarks/schedule.py measures on CPU')
    torch.backends.cudnn.benchmark = True
    runs = []
    for mode, decoder, recompute in CONFIGS:
        runs.append(run(mode, decoder, recompute, args.batch, args.steps))
        print(runs[-1], flush=True)
    base = runs[0]
    lines = ['| mode | decoder | recompute | img/s | step time vs E2E | peak memory | memory saving vs E2E |',
             '|---|---|---|---|---|---|---|']
    for r in runs:
        lines.append(f'| {r["mode"]} | {r["decoder"]} | {"yes" if r["recompute"] else "no"} | {r["img_per_s"]:.0f} | '
                     f'{r["step_seconds"] / base["step_seconds"]:.2f}x | {r["peak_bytes"] / 2**30:.2f} GiB | '
                     f'{base["peak_bytes"] / r["peak_bytes"]:.2f}x |')
    result = dict(device=torch.cuda.get_device_name(), date=time.strftime('%Y-%m-%d'), torch=torch.__version__,
                  batch_per_view=args.batch, bf16=True, channels_last=True, runs=runs, table='\n'.join(lines))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(result['table'])


if __name__ == '__main__':
    main()
