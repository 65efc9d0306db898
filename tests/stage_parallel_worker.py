"""One process of the stage-parallel tests (run by tests/test_stage_parallel.py).

Usage: python stage_parallel_worker.py RANK WORLD PORT OUT_PREFIX JOBS_JSON
JOBS_JSON: a list of [mode, placement]; each runs STEPS synchronous steps from the same start, in one process group.
"""
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from loco_timm import LocalLearner  # noqa: E402
from loco_timm.stage_parallel import StageParallel  # noqa: E402

STEPS, BATCH = 3, 6


def build(mode):
    """test_resnet (BatchNorm in the stages and the decoders: each stage sees the whole batch on one process)."""
    import timm
    torch.manual_seed(0)
    model = timm.create_model('test_resnet')
    return LocalLearner(model, mode=mode, input_size=(3, 32, 32)).double()


def batches():
    g = torch.Generator().manual_seed(1)
    return [tuple(torch.randn(BATCH, 3, 32, 32, generator=g, dtype=torch.float64) for _ in range(2))
            for _ in range(STEPS)]


def state(learner):
    """Every parameter and buffer this process holds (not on the meta device)."""
    return {k: v.detach().clone() for k, v in learner.state_dict().items() if v.device.type != 'meta'}


def reference(mode):
    """The single-process run: every parameter and buffer after STEPS steps."""
    learner = build(mode)
    optimizer = torch.optim.SGD(learner.parameters(), lr=0.05, momentum=0.9)
    for view1, view2 in batches():
        optimizer.zero_grad()
        learner.step(view1, view2)
        optimizer.step()
    return state(learner)


def run(mode, placement, rank):
    learner = build(mode)
    total = sum(p.numel() for p in learner.parameters())
    sp = StageParallel(learner, placement)
    params = sp.parameters()
    optimizer = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    for view1, view2 in batches():
        optimizer.zero_grad()
        sp.step(view1, view2) if rank == 0 else sp.step()
        optimizer.step()
    return state(learner), dict(held=sum(p.numel() for p in params), total=total, units=sp.local_units)


def main(rank, world, port, out, jobs):
    from safetensors.torch import save_file
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=world)
    for i, (mode, placement) in enumerate(json.loads(jobs)):
        tensors, info = run(mode, placement, rank)
        save_file({k: v.contiguous() for k, v in tensors.items()}, f'{out}-{i}-rank{rank}.safetensors')
        with open(f'{out}-{i}-rank{rank}.json', 'w') as f:
            json.dump(info, f)
    dist.destroy_process_group()


if __name__ == '__main__':
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
