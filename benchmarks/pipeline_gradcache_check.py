"""Check that the E2E baseline of ``benchmarks/pipeline.py`` (GPipe through ``torch.distributed.pipelining`` with
the whole-batch NT-Xent computed as GradCache does) gives the gradient of one process: test_vit (no batch
statistics) in float64, 2 gloo processes, 4 micro-batches. Prints the largest relative difference over parameters.

Usage: ``python benchmarks/pipeline_gradcache_check.py``
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def build():
    import timm

    from loco_timm import LocalLearner
    torch.manual_seed(0)
    return LocalLearner(timm.create_model('test_vit', img_size=32), mode='e2e', decoder_norm='layer',
                        input_size=(3, 32, 32)).double()


def views():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(8, 3, 32, 32, generator=g, dtype=torch.float64) for _ in range(2)]


def grads(learner) -> dict:
    return {n: p.grad for n, p in learner.named_parameters() if p.grad is not None}


def worker(rank: int, port: int, microbatches: int, out: str) -> None:
    import pipeline
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage, ScheduleGPipe
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=2)
    learner = build()
    half = len(learner.stages) // 2
    placement = [list(range(half)), list(range(half, len(learner.stages)))]
    stage = PipelineStage(pipeline._Part(learner, placement[rank]), rank, 2, torch.device('cpu'))
    schedule = ScheduleGPipe(stage, n_microbatches=microbatches, loss_fn=lambda o, g: (o * g).sum(),
                             scale_grads=False)
    pipeline._gpipe_step(schedule, rank, 2, views() if rank == 0 else None, microbatches, learner.loss.temperature)
    torch.save(grads(learner), f'{out}.{rank}')
    dist.destroy_process_group()


def main() -> None:
    if len(sys.argv) > 1:
        return worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
    reference = build()
    reference.step(*views())
    expected = grads(reference)
    with tempfile.TemporaryDirectory() as tmp, socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
        s.close()
        out = str(Path(tmp) / 'grads')
        env = {**os.environ, 'OMP_NUM_THREADS': '1'}
        procs = [subprocess.Popen([sys.executable, __file__, str(r), str(port), '4', out], env=env) for r in (0, 1)]
        if any(p.wait() for p in procs):
            raise SystemExit('a process failed')
        got = {**torch.load(f'{out}.0', weights_only=True), **torch.load(f'{out}.1', weights_only=True)}
    assert got.keys() == expected.keys()
    worst = max((got[k] - expected[k]).abs().max().item() / (expected[k].abs().max().item() + 1e-30) for k in got)
    print(f'{len(got)} parameter gradients, largest relative difference to one process: {worst:.2e}')


if __name__ == '__main__':
    main()
