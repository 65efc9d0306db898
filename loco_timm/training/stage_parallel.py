"""Stage parallelism: a learner's stages on P processes as contiguous groups, local units without a global backward
lock.

Process ``r`` of the pipeline group holds the stages of ``placement[r]``, the decoders of the units whose last stage
it holds, and (for its optimizer) only their parameters; the other stages and decoders are released (moved to the
``meta`` device). A step (:meth:`StageParallel.step`, synchronous and exact):

1. process 0 takes both views' images; every other process receives the activation at its lower cut, detached;
2. each process runs :func:`~loco_timm.core.schedule.run_stages` over its stages: the losses of its units and
   their backward passes, as in one process;
3. it sends its top stage's output to the next process, and the gradient of each unit that started below it (LoCo:
   the unit of the stage below, one hop; E2E: the one unit, all the way down) to the previous one;
4. it receives the gradients of the units that continue above it and carries them down its stages.

GIM sends no gradient back; LoCo one tensor per cut; E2E is plain pipeline backprop without micro-batches. Whole
mini-batches stream through (no micro-batches), so every NT-Xent keeps all its negatives, and the weights after N
steps equal one process's with the same batches (``tests/test_stage_parallel.py``, 2 and 3 gloo processes).
Communication is ``torch.distributed`` point-to-point (gloo on CPU, NCCL on GPU); each message is a small header
(dtype, shape) and the tensor.

Pipelined (``pipelined=True``, LoCo and GIM): see :meth:`StageParallel.step`. A process's top stage runs with its
weights stashed (PipeDream's weight stashing, :func:`~loco_timm.core.gradients.stashed_forward`) and keeps its graph for
one step, so its delayed gradient, computed with the weights of its forward, costs no second forward. The delayed
gradient is computed into its own buffers and added after the step's own gradients; :meth:`StageParallel.settle`
computes it early (before a checkpoint) and :meth:`StageParallel.delayed_state` / :meth:`StageParallel.load_delayed`
carry it through one, so a resumed run adds the same numbers in the same order. ``loco-timm train`` drives all of it
through :mod:`loco_timm.training.stage_training`.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..core.schedule import deliver, run_stages
from ..core.stages import stage_tensors
from ..errors import ConfigError

__all__ = ['balance', 'check_placement', 'StageParallel']

_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def balance(costs: Sequence[float], parts: int) -> list[list[int]]:
    """Contiguous groups of stage indices, ``parts`` of them, that minimise the largest group's cost (the sum of its
    stages' ``costs``, e.g. measured step times), by dynamic programming over the cut points.

    Raises:
        ValueError: If there are fewer stages than parts.
    """
    n = len(costs)
    if not 1 <= parts <= n:
        raise ValueError(f'cannot place {n} stages on {parts} processes: use 1 to {n} processes')
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + float(c))

    def cost(j: int, i: int) -> float:  # the group of stages j..i-1
        return prefix[i] - prefix[j]

    best = {(0, 0): (0.0, [])}  # (stages placed, groups) -> (largest group cost, cut points)
    for g in range(1, parts + 1):
        for i in range(g, n - (parts - g) + 1):
            options = [(max(best[(j, g - 1)][0], cost(j, i)), best[(j, g - 1)][1] + [i])
                       for j in range(g - 1, i) if (j, g - 1) in best]
            best[(i, g)] = min(options)
    cuts = [0] + best[(n, parts)][1]
    return [list(range(a, b)) for a, b in zip(cuts, cuts[1:])]


def check_placement(placement: Sequence[Sequence[int]], num_stages: int) -> list[list[int]]:
    """``placement`` as lists, if it covers stages ``0..num_stages-1`` in order with contiguous, non-empty groups.

    Raises:
        ValueError: Naming what is wrong and what a valid placement looks like.
    """
    groups = [list(g) for g in placement]
    flat = [k for g in groups for k in g]
    if not groups or any(not g for g in groups) or flat != list(range(num_stages)):
        raise ValueError(f'placement {placement!r} must split stages 0..{num_stages - 1} into contiguous, non-empty '
                         f'groups in order, one per process, e.g. {balance([1] * num_stages, min(2, num_stages))}')
    return groups


def _wire(group, device: torch.device) -> torch.device:
    """The device tensors travel from: NCCL moves only CUDA tensors, gloo only CPU ones (several processes sharing
    one GPU, which NCCL refuses, communicate through gloo and stage their tensors on the CPU)."""
    return device if dist.get_backend(group) == 'nccl' else torch.device('cpu')


def _send(t: torch.Tensor, dst: int, group) -> None:
    for x in _message(t, group):
        dist.send(x, dst, group=group)


def _isend(t: torch.Tensor, dst: int, group) -> list:
    """Like :func:`_send` without waiting: the works (which keep their tensors alive) to wait on later."""
    return [(dist.isend(x, dst, group=group), x) for x in _message(t, group)]


def _message(t: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A tensor as its three messages: the header's length, the header (dtype and shape), the data."""
    wire = _wire(group, t.device)
    header = torch.tensor([_DTYPES.index(t.dtype), t.ndim, *t.shape], dtype=torch.int64, device=wire)
    size = torch.tensor([len(header)], dtype=torch.int64, device=wire)
    return size, header, t.to(wire).contiguous()


def _recv(src: int, group, device: torch.device) -> torch.Tensor:
    wire = _wire(group, torch.device(device))
    size = torch.empty(1, dtype=torch.int64, device=wire)
    dist.recv(size, src, group=group)
    header = torch.empty(int(size), dtype=torch.int64, device=wire)
    dist.recv(header, src, group=group)
    header = header.tolist()
    t = torch.empty(header[2:2 + header[1]], dtype=_DTYPES[header[0]], device=wire)
    dist.recv(t, src, group=group)
    return t.to(device)


class StageParallel:
    """One process's part of a stage-parallel learner (see the module).

    Args:
        learner: The whole :class:`~loco_timm.LocalLearner`, built identically on every process (same seed); the
            stages and decoders of other processes are released.
        placement: Stage indices per process (:func:`balance`, :func:`check_placement`).
        group: The pipeline's process group (default: the whole world, whose size must be ``len(placement)``).
        gather_group: Data parallelism across pipelines: the group of the processes holding the same stages, over
            which NT-Xent gathers negatives and :meth:`average_gradients` averages (None: no data parallelism, each
            loss on the whole batch). Process 0 of each pipeline then takes its replica's share of the batch.
        pipelined: Do not wait for the gradients of the units that continue on the next process: the top stage's
            gradient is applied one step late (see :meth:`step`). Only for units that cross a cut by one stage
            (LoCo, GIM).

    Raises:
        ValueError: Bad placement, a placement of another size than the group, a learner with soft sharing, or a
            cut carrying more than one tensor.
    """

    def __init__(self, learner: nn.Module, placement: Sequence[Sequence[int]], group=None, gather_group=None,
                 pipelined: bool = False):
        self.placement = check_placement(placement, len(learner.stages))
        self.group = group
        size = dist.get_world_size(group)
        if size != len(self.placement):
            raise ValueError(f'placement has {len(self.placement)} groups of stages for {size} processes: give one '
                             f'group per process')
        if learner.sharing == 'l2':
            raise ConfigError('sharing="l2" keeps a copy of each shared stage on both sides of a cut: not supported '
                              'with stage parallelism')
        self.learner, self.rank, self.size = learner, dist.get_rank(group), size
        # point-to-point calls take global ranks
        self.peers = [dist.get_global_rank(group, r) if group is not None else r for r in range(size)]
        self.gather_group = gather_group
        self.first, self.last = self.placement[self.rank][0], self.placement[self.rank][-1]
        units = learner.units
        self.active = [j for j, (lo, hi) in enumerate(units) if lo <= self.last and hi >= self.first]
        self.local_units = [j for j in self.active if self.first <= units[j][1] <= self.last]
        above = self.placement[self.rank + 1][-1] if self.rank + 1 < size else self.last
        # gradients received from rank + 1, in the order it sends them (see to_below)
        self.from_above = sorted((j for j in self.active if units[j][1] > self.last),
                                 key=lambda j: (units[j][1] > above, j))
        # gradients sent to rank - 1: units ending here first (ready after the local pass), then those ending above
        below = [j for j in self.active if units[j][0] < self.first]
        self.to_below = [j for j in below if j in self.local_units] + [j for j in below if j not in self.local_units]
        learner.loss.gather = gather_group is not None
        learner.loss.group = gather_group
        self.pipelined, self._pending, self._delayed, self._sends = pipelined, None, None, []
        one_hop = all(units[j][0] == self.last for j in self.from_above) and all(
            units[j][0] == self.first - 1 and units[j][1] <= self.last for j in self.to_below)
        if pipelined and not one_hop:
            raise ConfigError('pipelined stage parallelism needs every unit that crosses a cut to start at the stage '
                              'just below it (LoCo, GIM): E2E and longer custom units need the synchronous mode')
        self._release()
        held = {id(p) for k in range(self.first, self.last + 1) for p in learner.stages[k].parameters()}
        held |= {id(p) for j in self.local_units for p in learner.decoders[j].parameters()}
        self._named = [(name, p) for name, p in learner.named_parameters() if id(p) in held]

    def _release(self) -> None:
        """Move every parameter and buffer this process does not use (other stages and decoders, the encoder's
        classifier) to the meta device: their memory is freed."""
        learner = self.learner
        kept = [learner.stages[k] for k in range(self.first, self.last + 1)]
        kept += [learner.decoders[j] for j in self.local_units]
        local = {id(t) for m in kept for t in list(m.parameters()) + list(m.buffers())}
        for module in list(learner.encoder.modules()) + list(learner.decoders.modules()):
            for name, p in list(module._parameters.items()):
                if p is not None and id(p) not in local and p.device.type != 'meta':
                    module._parameters[name] = nn.Parameter(p.detach().to('meta'), requires_grad=p.requires_grad)
            for name, b in list(module._buffers.items()):
                if b is not None and id(b) not in local and b.device.type != 'meta':
                    module._buffers[name] = b.to('meta')

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """This process's parameters with their names in the learner: its stages' and its units' decoders'."""
        return list(self._named)

    def parameters(self) -> list[nn.Parameter]:
        """This process's parameters (give these to its optimizer)."""
        return [p for _, p in self.named_parameters()]

    def step(self, view1: torch.Tensor | None = None, view2: torch.Tensor | None = None,
             backward: Callable[[torch.Tensor], None] | None = None,
             device: torch.device | str = 'cpu') -> dict[int, torch.Tensor]:
        """One step on this process: the views are needed on process 0 only. Gradients accumulate into ``.grad``.

        Synchronous: after its local units, the process waits for the gradients of the units that continue above
        it and carries them down, so the step's gradients are one process's. Pipelined: it sends and goes on. Its
        top stage ran batch t with a stashed copy of its weights and BatchNorm statistics and keeps that graph; at
        step t + 1 the next process's gradients for batch t arrive (computed at its step t on this output) and one
        weight-gradient pass carries them, summed with those of this process's units ending there, to the top
        stage's weights: exactly one process's gradient of batch t at the weights of step t, applied one step late
        (at step t + 1's optimizer step). Every other stage's and decoder's gradient, and the gradient the top
        stage's own units carry down, is the step's own. The last batch's delayed gradient is applied by
        :meth:`finish`.

        Returns:
            ``{unit index: detached loss}`` of this process's units.
        """
        learner, backward = self.learner, backward or (lambda loss: loss.backward())
        device = torch.device(device)
        self._wait_sends()
        if self.rank == 0:
            if view1 is None or view2 is None:
                raise ValueError('process 0 of the pipeline needs view1 and view2')
            h = torch.cat([view1, view2])
        else:
            h = _recv(self.peers[self.rank - 1], self.group, device)
        state, out = run_stages(learner, h, self.active, backward, start=self.first, stop=self.last,
                                        stash=self.pipelined and bool(self.from_above))
        if self.rank < self.size - 1:
            tensors = stage_tensors(out)
            if len(tensors) != 1 or not isinstance(out, torch.Tensor):
                raise ConfigError(f'stage {self.last} hands {len(tensors)} values over the cut to the next process: '
                                  f'stage parallelism needs a single tensor there, choose another placement')
            self._out(out.detach(), self.peers[self.rank + 1])
        sent = self._send_ready(state, [])
        if self.pipelined:
            self._settle(device)
            self._add_delayed()
            self._pending = state if self.from_above else None
        else:
            sent = self._receive(state, device, sent)
            if len(sent) != len(self.to_below):
                missing = [j for j in self.to_below if j not in sent]
                raise RuntimeError(f'units {missing} have no gradient at stage {self.first}\'s input to send back')
        return {j: state.losses[j] for j in self.local_units if j in state.losses}

    def average_gradients(self) -> None:
        """Data parallelism across pipelines: average this process's gradients over ``gather_group`` (the replicas
        of its stages), as one all-reduce. Call it after :meth:`step`, before the optimizer step."""
        if self.gather_group is None:
            return
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=self.gather_group)
        flat /= dist.get_world_size(self.gather_group)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def finish(self) -> None:
        """Pipelined: receive and carry down the last batch's delayed gradients into ``.grad`` (step the optimizer
        after it), and wait for the sends still in flight. Every process of the pipeline calls it once, after its
        last step."""
        self.settle(next(iter(self.parameters())).device)
        self._add_delayed()
        self._wait_sends()

    def settle(self, device: torch.device | str = 'cpu') -> None:
        """Pipelined: receive the previous batch's gradients from the next process now and compute the top
        stage's delayed weight gradient (through that batch's kept graph), kept apart until the next step adds it
        after its own: a checkpoint then holds it (:meth:`delayed_state`) and a resumed run is exact. Every process
        of the pipeline calls it at the same step (before a checkpoint)."""
        self._settle(torch.device(device))
        self._wait_sends()

    def _settle(self, device: torch.device) -> None:
        if self._pending is not None and self._delayed is None:
            params = self.parameters()
            kept = [p.grad for p in params]
            for p in params:
                p.grad = None
            self._receive(self._pending, device)
            self._delayed = {name: p.grad for name, p in self.named_parameters() if p.grad is not None}
            for p, grad in zip(params, kept):
                p.grad = grad
        self._pending = None

    def delayed_state(self) -> dict[str, torch.Tensor]:
        """The settled delayed gradient, by parameter name (empty when none): what a checkpoint keeps."""
        if self._pending is not None:
            raise RuntimeError('call settle() before delayed_state(): a gradient is still on its way')
        return {name: g.detach() for name, g in (self._delayed or {}).items()}

    def load_delayed(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`delayed_state` of a checkpoint: the next step adds it to its gradients.

        Raises:
            ValueError: A name that is not one of this process's parameters (another placement).
        """
        own = dict(self.named_parameters())
        unknown = sorted(set(tensors) - set(own))
        if unknown:
            raise ConfigError(f'the delayed gradient of {unknown[0]} belongs to another process: resume with the '
                              f'placement the checkpoint was written with')
        # in the parameter's memory layout (e.g. channels_last), as the uninterrupted run computed it
        self._delayed = {name: torch.empty_like(own[name]).copy_(t) for name, t in tensors.items()} or None

    def _add_delayed(self) -> None:
        """Add the settled delayed gradient after this step's own (the same order in a resumed run)."""
        for name, p in self.named_parameters():
            grad = (self._delayed or {}).get(name)
            if grad is not None:
                if p.grad is None:
                    p.grad = grad.clone()
                else:
                    p.grad.add_(grad)
        self._delayed = None

    def _receive(self, state, device, sent: list[int] | None = None) -> list[int]:
        """Receive the gradients of the units continuing above and carry them down ``state``'s stages."""
        sent = [] if sent is None else sent
        if state is None:
            return sent
        for j in self.from_above:
            grad = _recv(self.peers[self.rank + 1], self.group, device)
            deliver(self.learner, state, j, self.last, [grad if grad.numel() else None])
            sent = self._send_ready(state, sent)
        return sent

    def _out(self, t: torch.Tensor, dst: int) -> None:
        if self.pipelined:
            self._sends += _isend(t, dst, self.group)
        else:
            _send(t, dst, self.group)

    def _wait_sends(self) -> None:
        for work, _ in self._sends:
            work.wait()
        self._sends = []

    def _send_ready(self, state, sent: list[int]) -> list[int]:
        """Send, in ``to_below`` order, the gradients that have reached this process's lower cut."""
        for j in self.to_below:
            if j in sent:
                continue
            if state.at.get(j) != self.first - 1 or j not in state.grad:
                break  # keep the order: the previous process receives in to_below order
            grad = state.grad.pop(j)[0]
            self._out(grad if grad is not None else torch.zeros(0), self.peers[self.rank - 1])
            sent = sent + [j]
        return sent
