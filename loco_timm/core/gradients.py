"""Gradient book-keeping of :meth:`loco_timm.LocalLearner.step`: where each unit's gradient is, per tensor of a
stage output (a stage may hand several tensors over a cut), and the autograd calls that carry it down a stage.

A gradient here is a list aligned with :func:`loco_timm.core.stages.stage_tensors` of a stage output: one entry per
tensor, ``None`` where no gradient arrived (a plain value, a tensor no loss reached).
"""
from __future__ import annotations

import torch
from torch import nn

from .stages import stage_tensors

Unit = tuple[int, int]
__all__ = ['Schedule', 'output_grads', 'backward_to', 'input_grads', 'rng_state', 'set_rng_state',
           'stashed_forward']


def rng_state(device: torch.device) -> tuple:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == 'cuda' else None


def set_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def stashed_forward(module: nn.Module, *args):
    """``module(*args)`` with weight stashing (PipeDream): on copies of its parameters and buffers, so the graph keeps
    the weights (and BatchNorm statistics) of this forward and stays valid after an optimizer step or a later
    forward updates the originals in place; its backward computes the gradients with them. Gradients flow through
    the copies into the parameters; the forward's buffer updates (BatchNorm running statistics) are copied back."""
    params = {name: p.clone() if p.requires_grad else p.detach().clone()
              for name, p in module.named_parameters() if p.device.type != 'meta'}
    buffers = {name: b.clone() for name, b in module.named_buffers() if b.device.type != 'meta'}
    out = torch.func.functional_call(module, {**params, **buffers}, args, strict=False)
    with torch.no_grad():
        for name, b in module.named_buffers():
            if name in buffers:
                b.copy_(buffers[name])
    return out


def _add_grads(a: list, b: list) -> list:
    return [y if x is None else x if y is None else x + y for x, y in zip(a, b)]


def output_grads(output, original, feature) -> list:
    """A decoder's gradient, placed on the stage output's tensors (each feature tensor's first slot; None
    elsewhere)."""
    grads = {}
    for t, leaf in zip(stage_tensors(original), stage_tensors(feature)):
        grads.setdefault(id(t), leaf.grad if leaf.grad is not None else torch.zeros_like(leaf))
    return [grads.pop(id(t), None) for t in stage_tensors(output)]


def _pairs(outs: list, grads: list) -> tuple[list, list]:
    kept = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
    return [o for o, _ in kept], [g for _, g in kept]


def backward_to(outs: list, grads: list, inputs: list) -> None:
    """Accumulate the gradient of the stage outputs into ``inputs`` (parameters, input leaves)."""
    outs, grads = _pairs(outs, grads)
    if outs and inputs:
        torch.autograd.backward(outs, grads, inputs=inputs)


def input_grads(outs: list, grads: list, inputs: list) -> list:
    """d(outputs . grads)/d(inputs) for the stage's input tensors (None where no gradient flows), graph kept."""
    outs, grads = _pairs(outs, grads)
    leaves = [t for t in inputs if t.requires_grad]
    found = iter(torch.autograd.grad(outs, leaves, grads, retain_graph=True, allow_unused=True)
                 if outs and leaves else [None] * len(leaves))
    return [next(found) if t.requires_grad else None for t in inputs]


class Schedule:
    """Book-keeping of one ``LocalLearner.step``: stage graphs still alive, and where each unit's gradient is."""

    def __init__(self, spans: dict[int, Unit], members: dict[int, list[int]],
                 weights: dict[int, set[int]] | None = None):
        self.spans, self.members = spans, members
        # stage -> units whose gradient its weights take (default: every unit containing it)
        self.weights = weights if weights is not None else {k: set(js) for k, js in members.items()}
        self.inputs: dict[int, torch.Tensor] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.losses: dict[int, torch.Tensor] = {}
        self.at: dict[int, int] = {}  # unit -> stage whose output its gradient has reached
        # unit -> d loss / d output of stage at[unit], one entry per tensor of the output (None: no gradient)
        self.grad: dict[int, list] = {}
        self.total: dict[int, list] = {}  # stage -> summed d loss / d output over all units so far
        self.rng: dict[int, tuple] = {}  # stage -> random state before its forward (recompute)
        self.remote: set[int] = set()  # units whose loss another process computed (stage parallelism)
        self.bottom = 0  # the lowest stage with a graph
        self.keep: int | None = None  # a stage whose graph waits across steps (pipelined): never dropped for recompute

    def ended(self, unit: int) -> bool:
        """Whether ``unit``'s loss has been computed (here or on another process)."""
        return unit in self.losses or unit in self.remote

    def arrive(self, unit: int, stage: int, grad: list) -> None:
        self.at[unit], self.grad[unit] = stage, grad
        if unit not in self.weights.get(stage, ()):
            grad = [None] * len(grad)  # it passes through this stage without training its weights
        self.total[stage] = grad if stage not in self.total else _add_grads(self.total[stage], grad)
