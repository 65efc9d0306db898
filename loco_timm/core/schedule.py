"""The unit-by-unit schedule of a :class:`~loco_timm.core.learner.LocalLearner` step (see that module): each stage's
forward once, every unit's loss as soon as its top stage has run, its gradient carried down its stages at once, one
weight-gradient pass per stage when the last unit containing it has delivered, and the stage's graph freed then.

:func:`run_stages` runs it over all stages (:meth:`LocalLearner.step`) or over a range of them, and :func:`deliver`
carries down a gradient computed elsewhere: the protocol of stage parallelism
(:mod:`loco_timm.training.stage_parallel`), kept off the learner's public surface.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .gradients import (
    Schedule,
    backward_to,
    input_grads,
    output_grads,
    rng_state,
    set_rng_state,
    stashed_forward,
)
from .sharing import weight_units
from .stages import detach_stage_output, stage_tensors

__all__ = ['run_stages', 'deliver']


def run_stages(learner, h, active: Sequence[int], backward: Callable[[torch.Tensor], None], *, start: int = 0,
               stop: int | None = None, stash: bool = False) -> tuple[Schedule, object]:
    """:meth:`LocalLearner.step`'s schedule over stages ``start..stop`` only (stage parallelism): ``h`` is stage
    ``start``'s input (both views' images, or the output of stage ``start - 1``). Runs the losses of the ``active``
    units whose last stage is in range; an active unit ending above ``stop`` waits for :func:`deliver`, one starting
    below ``start`` leaves its gradient at stage ``start``'s input (``state.grad[j]``, ``state.at[j] == start - 1``).
    Returns the schedule and stage ``stop``'s output (default: up to the active units' last stage).

    ``stash`` (pipelined stage parallelism): stage ``stop`` runs with its weights stashed
    (:func:`~loco_timm.core.gradients.stashed_forward`) and keeps its graph until the units above deliver, even
    across an optimizer step: its weight gradient is then that of the weights of this forward."""
    spans = {j: learner.units[j] for j in active}
    top = max(last for _, last in spans.values()) if stop is None else stop
    bottom = max(start, min(first for first, _ in spans.values()))
    batch = stage_tensors(h)[0].shape[0] // 2
    needs_input_grad = {k for first, last in spans.values() for k in range(first + 1, last + 1)}
    members = {k: [j for j, (first, last) in spans.items() if first <= k <= last] for k in range(top + 1)}
    every = dict(enumerate(learner.units))  # who owns a stage's weights does not depend on which units run
    owners = weight_units(learner.sharing, every, {k: [j for j, (lo, hi) in every.items() if lo <= k <= hi]
                                                for k in range(top + 1)})
    state = Schedule(spans, members, owners)
    state.bottom = bottom
    state.keep = stop if stash else None
    for k in range(start, top + 1):
        if k < bottom or not members[k]:
            with torch.no_grad():
                h = learner.stages[k](h)
            continue
        state.inputs[k] = detach_stage_output(h, k in needs_input_grad)
        if learner.recompute:
            state.rng[k] = rng_state(stage_tensors(h)[0].device)
        run = stashed_forward if k == state.keep else lambda stage, x: stage(x)
        h = state.outputs[k] = run(learner.stages[k], state.inputs[k])
        for j in [j for j, (_, last) in spans.items() if last == k]:  # units whose loss sits on this stage
            original = learner.feature(k, h)
            feature = detach_stage_output(original, True)
            z = learner.decoders[j](feature)
            loss = learner.loss(z[:batch], z[batch:])
            backward(loss)
            state.losses[j] = loss.detach()
            state.arrive(j, k, output_grads(h, original, feature))
            del feature, original, z, loss
        h = detach_stage_output(h)  # the graph stays referenced by state.outputs only, so freeing it there frees it
        _carry_down(learner, k, state)
    return state, h

def deliver(learner, state: Schedule, unit: int, stage: int, grad: list) -> None:
    """The gradient of ``unit``'s loss, computed on another process, at the output of ``stage`` (the top of
    :func:`run_stages`' range): carried down like a local one."""
    state.remote.add(unit)
    state.arrive(unit, stage, grad)
    _carry_down(learner, stage, state)

def _carry_down(learner, k: int, state: Schedule) -> None:
    for m in range(k, state.bottom - 1, -1):  # carry gradients down and free every stage no later unit needs
        if m in state.outputs:
            _advance_stage(learner, m, state)

def _advance_stage(learner, m: int, state: Schedule) -> None:
    """Move the gradients that reached stage m's output on: each unit that continues below gets its own
    input-gradient pass; once every unit containing stage m has delivered, one weight-gradient pass with their
    summed gradient, and the stage's graph is freed."""
    arrived = [j for j in state.members[m] if state.ended(j) and state.at[j] == m]
    waiting = [j for j in state.members[m] if not state.ended(j)]
    if state.outputs[m] is None:  # dropped by recompute
        if not arrived:
            return
        state.outputs[m] = _recompute_stage(learner, m, state)
    outs, inputs = stage_tensors(state.outputs[m]), stage_tensors(state.inputs[m])
    if not any(t.requires_grad for t in outs):  # nothing in this stage learns and no gradient passes through it
        for j in arrived:  # no unit continues below a stage whose input needs no gradient
            state.grad.pop(j)
            state.at[j] = m - 1
        if not waiting:
            del state.outputs[m], state.inputs[m]
        return
    params = [p for p in learner.stages[m].parameters() if p.requires_grad]
    leaves = [t for t in inputs if t.requires_grad]
    continuing = [j for j in arrived if state.spans[j][0] < m]
    single = len(state.members[m]) == 1 and continuing and continuing[0] in state.weights[m]
    if not waiting and single:  # one unit, which trains the stage: weights and input in one pass
        backward_to(outs, state.total.pop(m), params + leaves)
        state.arrive(continuing[0], m - 1, [t.grad if t.requires_grad else None for t in inputs])
        del state.outputs[m], state.inputs[m]
        return
    for j in arrived:
        if j in continuing:
            state.arrive(j, m - 1, input_grads(outs, state.grad.pop(j), inputs))
        else:
            state.grad.pop(j)
            state.at[j] = m - 1
    if not waiting:
        total = state.total.pop(m)
        if params:
            backward_to(outs, total, params)
        del state.outputs[m], state.inputs[m]
    elif learner.recompute and m != state.keep:  # a higher unit still needs this stage: keep its input only
        state.outputs[m] = None

def _recompute_stage(learner, m: int, state: Schedule) -> torch.Tensor:
    """Stage m's forward again, on its kept input with its first forward's random state; its buffers
    (BatchNorm running statistics) are restored afterwards, so they are updated once per step."""
    stage, inp = learner.stages[m], state.inputs[m]
    device = stage_tensors(inp)[0].device
    # the forward updates copies of the buffers (its graph may keep them), then the originals are put back
    owners = stage.buffer_owners() if hasattr(stage, 'buffer_owners') else [
        (module, name) for module in stage.modules() for name in module._buffers]
    originals = {(id(module), name): (module, name, module._buffers[name]) for module, name in owners
                 if module._buffers.get(name) is not None}
    for module, name, buf in originals.values():
        module._buffers[name] = buf.clone()
    devices = [device] if device.type == 'cuda' else []
    try:
        with torch.random.fork_rng(devices=devices):
            set_rng_state(state.rng[m], device)
            out = stage(inp)
    finally:
        for module, name, buf in originals.values():
            module._buffers[name] = buf
    return out
