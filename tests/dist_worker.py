"""One rank of the 2-process NT-Xent gradient test (run by tests/test_distributed.py).

Usage: python dist_worker.py RANK WORLD PORT OUT_FILE {autograd|detached}
"""
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from dist_common import GLOBAL_BATCH, build_learner, global_views, trainable_grads  # noqa: E402

import loco_timm.core.losses  # noqa: E402


def gather_without_grad(x):
    """A common mistake: all_gather without autograd, keeping only the local part differentiable."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    parts[dist.get_rank()] = x
    return parts


def main(rank: int, world: int, port: int, out: str, gather: str) -> None:
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=world)
    if gather == 'detached':
        loco_timm.core.losses.all_gather_with_grad = gather_without_grad
    learner = build_learner()
    view1, view2 = global_views()
    part = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    learner.step(view1[part], view2[part])
    grads = trainable_grads(learner)
    for g in grads.values():  # the trainer averages gradients once per step
        dist.all_reduce(g)
        g /= world
    if rank == 0:
        from safetensors.torch import save_file
        save_file(grads, out)
    dist.destroy_process_group()


if __name__ == '__main__':
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
