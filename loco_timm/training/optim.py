"""Optimiser and learning-rate schedule of the SimCLR recipe, from timm.

LARS (``timm.optim.Lars``) with biases and normalisation parameters in a group without weight decay; timm's LARS
applies its trust-ratio adaptation only to groups with weight decay, so they are excluded from adaptation too.
The learning rate is ``base_lr * batch_size / 256``, warmed up linearly and decayed with a cosine, per step.
"""
from __future__ import annotations

import math

import torch
from timm.optim import create_optimizer_v2, param_groups_weight_decay
from timm.scheduler import CosineLRScheduler

from ..config import TrainConfig

__all__ = ['build_optimizer', 'build_scheduler']


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig,
                    keep: list[torch.nn.Parameter] | None = None) -> torch.optim.Optimizer:
    """``cfg.optimizer`` (lars, sgd or adamw) over ``model``; 1-D parameters (biases, norms) get no weight decay.

    ``keep``: only these of ``model``'s parameters (one process's under stage parallelism), in the groups and order
    they have for the whole model."""
    kwargs = dict(momentum=cfg.momentum) if cfg.optimizer in ('lars', 'sgd') else {}
    if keep is None:
        return create_optimizer_v2(model, opt=cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                   filter_bias_and_bn=True, **kwargs)
    ids = {id(p) for p in keep}
    no_decay = getattr(model, 'no_weight_decay', lambda: set())()
    groups = [dict(g, params=[p for p in g['params'] if id(p) in ids])
              for g in param_groups_weight_decay(model, cfg.weight_decay, no_weight_decay_list=no_decay)]
    return create_optimizer_v2([g for g in groups if g['params']], opt=cfg.optimizer, lr=cfg.lr, weight_decay=0.0,
                               **kwargs)


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int) -> CosineLRScheduler:
    """Linear warm-up over ``warmup_steps`` then cosine decay to 0 at ``total_steps``; call ``step_update(step)``."""
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
    return CosineLRScheduler(optimizer, t_initial=max(total_steps - warmup_steps, 1), lr_min=0.0,
                             warmup_t=warmup_steps, warmup_lr_init=0.0, warmup_prefix=True, t_in_epochs=False)


def steps_for(epochs: float, steps_per_epoch: int) -> int:
    return max(int(math.ceil(epochs * steps_per_epoch)), 1)
