"""One process of the stage-parallel tests (run by tests/test_stage_parallel.py).

Usage: python stage_parallel_worker.py RANK WORLD PORT OUT_PREFIX JOBS_JSON
JOBS_JSON: a list of [mode, placement, pipelined]; each runs STEPS steps from the same start, in one process group
(pipelined: then finish() and one more optimizer step, which applies the last batch's delayed gradient).
"""
import copy
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from loco_timm import LocalLearner  # noqa: E402
from loco_timm.training.stage_parallel import StageParallel  # noqa: E402

STEPS, BATCH = 3, 6


def build(mode):
    """test_resnet (BatchNorm in the stages and the decoders: each stage sees the whole batch on one process);
    ``MODE+recompute``: with the learner's recomputation."""
    import timm
    torch.manual_seed(0)
    model = timm.create_model('test_resnet')
    mode, _, extra = mode.partition('+')
    return LocalLearner(model, mode=mode, input_size=(3, 32, 32), recompute=extra == 'recompute').double()


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


def pipelined_reference():
    """Pipelined LoCo on [[0, 1], [2, 3]], written out with plain autograd in one process: process 0's top stage
    (stage 1) runs batch t as a copy of itself (weight stashing, its BatchNorm statistics copied back), whose graph
    takes unit 0's gradient at step t and unit 1's, computed by process 1 at its step t, at step t + 1: the copy's
    weight gradient is stage 1's, applied one step late. Every other parameter gets its gradient in its step."""
    learner = build('loco')
    stages, decoders, loss = learner.stages, learner.decoders, learner.loss
    optimizer = torch.optim.SGD(learner.parameters(), lr=0.05, momentum=0.9)
    rank0 = [p for m in (stages[0], decoders[0]) for p in m.parameters()]
    rank1 = [p for m in (stages[2], stages[3], decoders[1], decoders[2]) for p in m.parameters()]

    def delayed(pending):
        stash, s1, grad = pending
        torch.autograd.backward(s1, grad, inputs=list(stash.parameters()))
        for p, q in zip(stages[1].parameters(), stash.parameters()):
            p.grad = q.grad

    pending = None
    for view1, view2 in batches():
        optimizer.zero_grad()
        x, n = torch.cat([view1, view2]), len(view1)
        s0 = stages[0](x)  # process 0, batch t
        stash = copy.deepcopy(stages[1])
        s1 = stash(s0)
        with torch.no_grad():
            for b, c in zip(stages[1].buffers(), stash.buffers()):
                b.copy_(c)
        z = decoders[0](s1)
        torch.autograd.backward(loss(z[:n], z[n:]), inputs=rank0 + list(stash.parameters()), retain_graph=True)
        if pending is not None:
            delayed(pending)
        a = s1.detach().requires_grad_()  # process 1, batch t
        s2 = stages[2](a)
        z1, z2 = decoders[1](s2), decoders[2](stages[3](s2))
        l1, l2 = loss(z1[:n], z1[n:]), loss(z2[:n], z2[n:])
        grad = torch.autograd.grad(l1, a, retain_graph=True)[0]  # unit 1 only: unit 2 starts at stage 2
        torch.autograd.backward([l1, l2], inputs=rank1)
        pending = (stash, s1, grad)
        optimizer.step()
    optimizer.zero_grad()
    delayed(pending)
    optimizer.step()
    return state(learner)


def run(mode, placement, rank, pipelined=False):
    learner = build(mode)
    total = sum(p.numel() for p in learner.parameters())
    sp = StageParallel(learner, placement, pipelined=pipelined)
    params = sp.parameters()
    optimizer = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    for view1, view2 in batches():
        optimizer.zero_grad()
        sp.step(view1, view2) if rank == 0 else sp.step()
        optimizer.step()
    if pipelined:
        optimizer.zero_grad()
        sp.finish()
        optimizer.step()
    return state(learner), dict(held=sum(p.numel() for p in params), total=total, units=sp.local_units)


def run_replicated(mode, placement, rank, world):
    """P stage groups x D replicas (global rank = replica * P + stage group), and plain data parallelism on the
    first D processes (the reference), each replica on its share of the batch. Returns (this process's state in
    the grid, its state in the data-parallel run or None)."""
    stages = len(placement)
    replicas = world // stages
    pipelines = [dist.new_group([d * stages + p for p in range(stages)]) for d in range(replicas)]
    gathers = [dist.new_group([d * stages + p for d in range(replicas)]) for p in range(stages)]
    data_parallel = dist.new_group(list(range(replicas)))
    replica, stage_group = divmod(rank, stages)
    share = slice(replica * BATCH // replicas, (replica + 1) * BATCH // replicas)
    learner = build(mode)
    sp = StageParallel(learner, placement, group=pipelines[replica], gather_group=gathers[stage_group])
    optimizer = torch.optim.SGD(sp.parameters(), lr=0.05, momentum=0.9)
    for view1, view2 in batches():
        optimizer.zero_grad()
        sp.step(view1[share], view2[share]) if stage_group == 0 else sp.step()
        sp.average_gradients()
        optimizer.step()
    grid = state(learner)
    if rank >= replicas:
        return grid, None
    learner = build(mode)
    learner.loss.group = data_parallel
    optimizer = torch.optim.SGD(learner.parameters(), lr=0.05, momentum=0.9)
    share = slice(rank * BATCH // replicas, (rank + 1) * BATCH // replicas)
    for view1, view2 in batches():
        optimizer.zero_grad()
        learner.step(view1[share], view2[share])
        for p in learner.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad, group=data_parallel)
                p.grad /= replicas
        optimizer.step()
    return grid, state(learner)


def main(rank, world, port, out, jobs):
    from safetensors.torch import save_file
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=world)
    for i, (mode, placement, pipelined) in enumerate(json.loads(jobs)):
        if world > len(placement):  # replicas of the pipeline
            grid, reference_state = run_replicated(mode, placement, rank, world)
            save_file({k: v.contiguous() for k, v in grid.items()}, f'{out}-{i}-rank{rank}.safetensors')
            if reference_state is not None:
                save_file({k: v.contiguous() for k, v in reference_state.items()},
                          f'{out}-{i}-dp{rank}.safetensors')
            continue
        tensors, info = run(mode, placement, rank, pipelined)
        save_file({k: v.contiguous() for k, v in tensors.items()}, f'{out}-{i}-rank{rank}.safetensors')
        with open(f'{out}-{i}-rank{rank}.json', 'w') as f:
            json.dump(info, f)
    dist.destroy_process_group()


if __name__ == '__main__':
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
