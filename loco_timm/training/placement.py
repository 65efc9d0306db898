"""Where the stages of a stage-parallel run go: the recipe's ``placement``, a resumed run's, or the balance of each
stage's step time measured on the main process (:func:`step_costs`: the stage's forward and backward with its units'
decoders and losses, on one replica's batch), broadcast so every process uses the same."""
from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist

from ..config import TrainConfig
from ..core.losses import nt_xent_loss
from ..core.stages import detach_stage_output, stage_tensors
from ..errors import ConfigError
from .stage_parallel import balance, check_placement

__all__ = ['step_costs', 'resolve_placement']


def step_costs(learner, h, repeats: int = 3) -> list[float]:
    """Per stage of ``learner``, the median seconds (after one warm-up) of its forward and backward with the losses of
    the units ending there (decoder, NT-Xent), on the stage input that ``h`` (both views' images) gives. Weights,
    buffers and the random state are left as they were."""
    device = stage_tensors(h)[0].device
    buffers = {k: b.clone() for k, b in learner.state_dict().items() if b.device.type != 'meta'}
    batch = stage_tensors(h)[0].shape[0] // 2
    costs = []
    with torch.random.fork_rng(devices=[device] if device.type == 'cuda' else []):
        for k, stage in enumerate(learner.stages):
            ends = [j for j, (_, last) in enumerate(learner.units) if last == k]
            above = any(first <= k < last for first, last in learner.units)
            times = []
            for _ in range(repeats + 1):
                x = detach_stage_output(h, k > 0)
                _sync(device)
                start = time.perf_counter()
                out = stage(x)
                total = 0.0
                for j in ends:
                    z = learner.decoders[j](learner.feature(k, out))
                    total = total + nt_xent_loss(z[:batch], z[batch:], learner.loss.temperature, gather=False)
                if above:  # a gradient from above passes through this stage
                    total = total + sum((t * torch.randn_like(t)).sum() for t in stage_tensors(out)
                                        if t.is_floating_point() and t.requires_grad)
                if torch.is_tensor(total) and total.requires_grad:
                    total.backward()
                _sync(device)
                times.append(time.perf_counter() - start)
            costs.append(statistics.median(times[1:]))
            h = detach_stage_output(out)
    learner.zero_grad(set_to_none=True)
    learner.load_state_dict(buffers, strict=False)
    return costs


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def resolve_placement(cfg: TrainConfig, learner, accelerator, batch: int, in_chans: int,
                      saved: list | None = None) -> list[list[int]]:
    """The placement of the run: the recipe's, a resumed run's (``saved``), or the measured balance (the same on
    every process).

    Raises:
        ConfigError: A placement that does not fit the backbone's stages, or more stage groups than stages.
    """
    n = len(learner.stages)
    try:
        if cfg.placement is not None or saved is not None:
            return check_placement(cfg.placement if cfg.placement is not None else saved, n)
        if cfg.stage_groups > n:
            raise ValueError(f'pipeline={cfg.stage_groups} stage groups for {n} stages: use at most {n}')
    except ValueError as err:
        raise ConfigError(f'{cfg.backbone}: {err}') from None
    found = [None]
    if accelerator.is_main_process:
        size = min(batch, 32)
        with torch.random.fork_rng(devices=[accelerator.device] if accelerator.device.type == 'cuda' else []):
            h = torch.randn(2 * size, in_chans, cfg.image_size, cfg.image_size, device=accelerator.device)
        with accelerator.autocast():
            costs = step_costs(learner, h)
        found = [balance(costs, cfg.stage_groups)]
    dist.broadcast_object_list(found, src=0)
    return found[0]
