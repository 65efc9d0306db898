"""How LoCo's overlapping units share a stage: the sharing ablation of the paper (arXiv:2008.01342; ResNet-50, 100
epochs, linear top-1: no sharing 65.1, upper-layer gradient only 65.3, L2 soft sharing 65.5 / 66.0 / 65.9 for
coefficients 1e-4 / 1e-3 / 1e-2, sharing the first 1 or 2 blocks of the next stage 64.8 / 65.3, full sharing 66.2).

``LocalLearner(mode="loco", sharing=...)``:

* ``"full"`` (LoCo): unit k = {S_k, S_k+1}; a stage in two units takes both units' gradients.
* ``"none"``: no stage is in two units: one unit per stage, i.e. GIM with the same decoders (the paper's row).
* ``"upper"``: the units of LoCo, but the weights of a stage in two units take only the gradient of the upper unit
  (the one whose lowest stage it is); the lower unit's gradient still passes through it to the stage below.
* ``"blocks"``: unit k = S_k plus the first ``sharing_blocks`` blocks of S_k+1, its loss on their output (the
  stages are cut after those blocks, so the learner has 2K - 1 stages); the last stage S_K-1 also gets a unit of its
  own, so it is trained whole. Shared: only those first blocks.
* ``"l2"``: unit k = S_k plus its *own copy* of S_k+1 wherever S_k+1 is also in a higher unit (identical at
  initialisation; the copy runs on S_k's output, so the forward is not shared); every step adds the gradient of
  ``sharing_l2 * sum ||copy - original||^2`` over the copies' parameters to both sides (backpropagated like a
  loss). The paper does not give the
  penalty's exact form; this is the plain squared L2 distance. The encoder (what ``forward``, readout and export
  use) holds the originals, which the upper units train; the copies live in ``learner.sharing_copies``.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from .stages import detach_stage_output, split_stages

__all__ = ['SHARING', 'sharing_units', 'weight_units', 'SoftSharing']

SHARING = ('full', 'none', 'upper', 'blocks', 'l2')
Unit = tuple[int, int]


def sharing_units(sharing: str, num_levels: int, top_unit: bool) -> list[Unit]:
    """The units of LoCo under ``sharing`` over ``num_levels`` stages (for ``"blocks"``: levels, each after the
    first cut in two, so the learner's stages are ``2 * num_levels - 1``)."""
    if sharing not in SHARING:
        raise ValueError(f'unknown sharing {sharing!r}: use one of {", ".join(SHARING)}')
    if num_levels < 2:
        raise ValueError(f'sharing={sharing!r} needs at least 2 stages, got {num_levels}')
    if sharing == 'none':
        return [(k, k) for k in range(num_levels)]
    if sharing == 'blocks':  # level 0 = stage 0; level k >= 1 = stages 2k-1 (its first blocks) and 2k (the rest)
        units = [(0 if k == 0 else 2 * k - 1, 2 * k + 1) for k in range(num_levels - 1)]
        return units + [(2 * num_levels - 3, 2 * num_levels - 2)]
    units = [(k, k + 1) for k in range(num_levels - 1)]
    return units + [(num_levels - 1, num_levels - 1)] if top_unit else units


def weight_units(sharing: str, spans: dict[int, Unit], members: dict[int, list[int]]) -> dict[int, set[int]]:
    """Per stage, the units whose gradient its weights take (``"upper"``: of the units containing a stage, the one
    that starts highest; otherwise all of them)."""
    if sharing != 'upper':
        return {k: set(js) for k, js in members.items()}
    return {k: {max(js, key=lambda j: spans[j][0])} if js else set() for k, js in members.items()}


class SoftSharing(nn.Module):
    """The copies of ``"l2"`` sharing: a deep copy of the encoder, split like it; ``copies[m]`` stands in for stage
    m inside the unit below it.

    Args:
        encoder: The learner's backbone (copied once, at construction).
        num_stages: The learner's stage count (the copy is split the same way).
        shared: Stages m that get a copy.
        coef: Penalty coefficient of ``coef * sum ||copy - original||^2``.
        input_size: ``(C, H, W)``, for a model split for one input size (see :func:`loco_timm.split_stages`).
    """

    def __init__(self, encoder: nn.Module, num_stages: int, shared: list[int], coef: float,
                 input_size: tuple[int, ...] | None = None):
        super().__init__()
        if coef < 0:
            raise ValueError(f'sharing_l2={coef} must be >= 0')
        self.encoder_copy = copy.deepcopy(encoder)
        stages = split_stages(self.encoder_copy, num_stages, input_size=input_size)
        self.__dict__['copies'] = {m: stages[m] for m in shared}
        self.coef = coef

    def pairs(self, originals: nn.ModuleList, stages: set[int] | None = None) -> list[tuple[nn.Parameter, ...]]:
        """(original, copy) parameter pairs of every copied stage (of ``stages`` only, if given)."""
        pairs = []
        for m, stage_copy in self.copies.items():
            if stages is not None and m not in stages:
                continue
            mine, theirs = list(originals[m].named_parameters()), list(stage_copy.named_parameters())
            if [n for n, _ in mine] != [n for n, _ in theirs]:
                raise RuntimeError(f'stage {m} and its copy list different parameters')
            pairs += [(a, b) for (_, a), (_, b) in zip(mine, theirs)]
        return pairs

    def penalty(self, originals: nn.ModuleList, stages: set[int] | None = None) -> torch.Tensor:
        """``coef * sum ||copy - original||^2`` over the copied stages (of ``stages`` only, if given). The step
        backpropagates it like a unit's loss, so a loss scaler (fp16) scales it too."""
        pairs = self.pairs(originals, stages)
        if not pairs:
            return torch.zeros(())
        return self.coef * sum(((a - b) ** 2).sum() for a, b in pairs)


def soft_step(learner, view1: torch.Tensor, view2: torch.Tensor, active: list[int], backward) -> dict:
    """:meth:`LocalLearner.step` under ``"l2"`` sharing: unit by unit up the original stages (each on a detached
    input), each unit's upper stage its copy where there is one, then the penalty's gradient.

    Returns:
        ``{unit index: detached loss}`` for the active units.
    """
    copies = learner.sharing_copies.copies
    batch, losses = view1.shape[0], {}
    starting = {learner.units[j][0]: j for j in active}
    top = max(learner.units[j][1] for j in active)
    h, done = torch.cat([view1, view2]), None  # done: stage k's output, already computed inside the unit below
    for k in range(top + 1):
        if done is not None:
            h, done = done, None
            continue
        j = starting.get(k)
        inp = detach_stage_output(h)
        if j is None:
            with torch.no_grad():
                h = learner.stages[k](inp)
            continue
        out = learner.stages[k](inp)
        first, last = learner.units[j]
        upper = out if last == k else (copies[last] if last in copies else learner.stages[last])(out)
        z = learner.decoders[j](learner.feature(last, upper))
        loss = learner.loss(z[:batch], z[batch:])
        backward(loss)
        losses[j] = loss.detach()
        h = detach_stage_output(out)
        if last != k and last not in copies:  # the original upper stage ran inside this unit
            done = detach_stage_output(upper)
        del out, upper, z, loss
    touched = {learner.units[j][1] for j in active} | {learner.units[j][0] for j in active}
    penalty = learner.sharing_copies.penalty(learner.stages, touched)
    if penalty.requires_grad and learner.sharing_copies.coef > 0:
        backward(penalty)  # through the trainer's backward, so that loss scaling applies to it as to the losses
    return losses
