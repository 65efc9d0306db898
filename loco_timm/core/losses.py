"""NT-Xent (InfoNCE) loss of SimCLR, as used by every LoCo / GIM / E2E unit.

For a batch of B images with two views each there are 2B embeddings. Each is an anchor whose positive is the
other view of its image; the remaining 2B-2 embeddings are its negatives. Similarities are cosine similarities
divided by the temperature. With ``torch.distributed`` initialised, the embeddings of all ranks are gathered
*with gradient* (``torch.distributed.nn.functional.all_gather``) so that every rank sees all 2N-2 negatives of the
global batch N; each rank averages the loss over its own 2B anchors, whose positives sit at the rank's offset in
the gathered matrix. Averaging the resulting gradients over ranks gives the gradient of the global-batch loss.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.nn.functional import all_gather

__all__ = ['nt_xent_loss', 'NTXentLoss', 'all_gather_with_grad']


class _GroupGather(torch.autograd.Function):
    """all_gather over a process group whose backward sums every rank's gradient of each part with one all_reduce
    (torch's own backward on gloo addresses subgroup ranks as global ranks, which fails for a subgroup)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return tuple(parts)

    @staticmethod
    def backward(ctx, *grads):
        stacked = torch.stack([g if g is not None else torch.zeros_like(grads[0]) for g in grads])
        dist.all_reduce(stacked, group=ctx.group)
        return stacked[dist.get_rank(ctx.group)], None


def all_gather_with_grad(x: torch.Tensor, group=None) -> list[torch.Tensor]:
    """Gather ``x`` from every rank of ``group`` (default: all); gradients flow back to the rank that produced each
    part."""
    if group is not None:
        return list(_GroupGather.apply(x, group))
    return list(all_gather(x))


def _distributed(group=None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1, gather: bool = True,
                 group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """NT-Xent loss of two batches of embeddings (view 1 and view 2 of the same images, in the same order).

    Args:
        z1: Embeddings of the first views, shape (B, D).
        z2: Embeddings of the second views, shape (B, D).
        temperature: Softmax temperature (SimCLR: 0.1).
        gather: Use the negatives of all ranks when ``torch.distributed`` is initialised. Every rank must then
            call this function with the same B.
        group: Gather over this process group only (default: every rank), e.g. the replicas of one stage group
            under stage parallelism.

    Returns:
        Scalar loss: mean over this rank's 2B anchors, computed in float32 (or float64 for float64 inputs).
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f'embeddings of the two views must both be (B, D), got {tuple(z1.shape)} and '
                         f'{tuple(z2.shape)}')
    if temperature <= 0:
        raise ValueError(f'temperature must be positive, got {temperature}')
    batch = z1.shape[0]
    z = torch.cat([z1, z2])
    z = F.normalize(z.float() if z.dtype in (torch.float16, torch.bfloat16) else z, dim=1)
    n = z.shape[0]
    rank = 0
    everyone = z
    if gather and _distributed(group):
        rank = dist.get_rank(group)
        everyone = torch.cat(all_gather_with_grad(z, group) if group is not None else all_gather_with_grad(z))
    logits = z @ everyone.T / temperature
    anchors = torch.arange(n, device=z.device)
    self_mask = torch.zeros_like(logits, dtype=torch.bool)
    self_mask[anchors, rank * n + anchors] = True
    logits = logits.masked_fill(self_mask, float('-inf'))
    positives = rank * n + (anchors + batch) % n
    return F.cross_entropy(logits, positives)


class NTXentLoss(nn.Module):
    """Module form of :func:`nt_xent_loss`."""

    def __init__(self, temperature: float = 0.1, gather: bool = True, group=None):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f'temperature must be positive, got {temperature}')
        self.temperature = temperature
        self.gather = gather
        self.group = group

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        return nt_xent_loss(z1, z2, self.temperature, self.gather, self.group)

    def extra_repr(self) -> str:
        return f'temperature={self.temperature}, gather={self.gather}'
