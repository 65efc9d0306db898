"""What differs between ways of training, chosen once before the loop (:func:`choose_strategy`).

The training loop (:mod:`loco_timm.training.train`) is written once. A strategy answers its questions with one small
contract (:class:`Strategy`):

* :meth:`~Strategy.batches`: this process's batches of an epoch, from a given step of it on (a mid-epoch resume);
* :meth:`~Strategy.step`: one step's forward and backward passes, leaving the gradients the optimizer applies, and
  the per-unit losses and the stop decision the loop can act on now (:class:`StepResult`);
* its state in a checkpoint beyond the learner, optimizer and random states: :meth:`~Strategy.save_hooks`,
  :meth:`~Strategy.load`, :meth:`~Strategy.progress`, :meth:`~Strategy.check_resume`.

Three strategies:

* :class:`Replicated`: one process, or data parallelism, over a random-access dataset: every process holds the whole
  learner and a share of each global batch (Accelerate's ``split_batches``); after the step one all-reduce averages
  the gradients and the per-unit losses;
* :class:`Streamed`: the same over a streamed source (:mod:`loco_timm.data.sources`), each process reading its own
  shards;
* :class:`~loco_timm.training.stage_training.StageParallelTraining`: the learner's stages on P process groups
  (recipe keys ``pipeline``, ``placement``, ``pipelined``).
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset

from ..config import TrainConfig
from ..core.learner import LocalLearner
from ..data.datasets import EpochSampler
from ..data.sources import StreamLoader, collate_encoded
from ..errors import ConfigError
from .runlock import Preemption

__all__ = ['StepResult', 'Strategy', 'Replicated', 'Streamed', 'average', 'placement_mismatch']


@dataclass
class StepResult:
    """What one step tells the loop.

    Attributes:
        step: The step ``losses`` belong to (stage parallelism reduces them without waiting: an earlier step's).
        losses: Per-unit losses averaged over the processes, or None when no reduction has completed yet.
        stop: Every process stops after this step (a signal arrived on one of them).
    """
    step: int
    losses: torch.Tensor | None
    stop: bool


class Strategy:
    """The contract between the training loop and a way of training (see the module).

    Args:
        cfg: The recipe.
        accelerator: The run's Accelerator.
        learner: The whole learner, built identically on every process.
        dataset: The pre-training dataset.
    """

    def __init__(self, cfg: TrainConfig, accelerator, learner: LocalLearner, dataset):
        self.cfg, self.accelerator, self.learner, self.dataset = cfg, accelerator, learner, dataset
        self.encoded = getattr(dataset, 'encoded', False)  # JPEG bytes, decoded on the device

    def trained_parameters(self) -> list[torch.nn.Parameter] | None:
        """The parameters this process's optimizer steps (None: the whole learner's)."""
        return None

    def prepare(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Hand the optimizer (and loaders) to Accelerate as this strategy needs; returns the optimizer to step."""
        raise NotImplementedError

    def batches(self, epoch: int, skip: int, steps: int) -> Iterator:
        """This process's batches ``(images, labels, index)`` of ``epoch`` from step ``skip`` of it on (None for each
        step on a process that loads no images)."""
        raise NotImplementedError

    def step(self, view1: torch.Tensor | None, view2: torch.Tensor | None, step: int, *, sync: bool,
             preemption: Preemption) -> StepResult:
        """One step; ``sync``: the loop logs, checkpoints or ends after it, so this step's losses are needed now."""
        raise NotImplementedError

    def save_hooks(self) -> dict:
        """Keyword arguments of :func:`~loco_timm.training.checkpoint.save_checkpoint` (its ``write``/``state``)."""
        return {}

    def load(self, checkpoint: Path) -> None:
        """Load this strategy's part of a checkpoint (after the learner and Accelerate's state)."""

    def progress(self) -> dict:
        """What the checkpoint's progress record says about this strategy."""
        return {}

    def check_resume(self, saved: dict) -> None:
        """Refuse to resume from a checkpoint this strategy cannot continue (``saved``: its progress record)."""
        problem = placement_mismatch(self.cfg, saved.get('placement'), None)
        if problem:
            raise ConfigError(problem)


class Replicated(Strategy):
    """One process or data parallelism over a random-access dataset (see the module)."""

    def __init__(self, cfg: TrainConfig, accelerator, learner: LocalLearner, dataset):
        super().__init__(cfg, accelerator, learner, dataset)
        self.sampler = EpochSampler(len(dataset), cfg.seed, keys=dataset.crops is not None)
        pin = accelerator.device.type == 'cuda'
        self.loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=self.sampler, drop_last=True,
                                 num_workers=cfg.num_workers, pin_memory=pin and not self.encoded,
                                 persistent_workers=cfg.num_workers > 0,
                                 collate_fn=collate_encoded if self.encoded else None)

    def prepare(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        # JPEG bytes stay on the CPU for the decoder, which puts its output on the device
        optimizer, self.loader = self.accelerator.prepare(optimizer, self.loader,
                                                          device_placement=[True, not self.encoded])
        return optimizer

    def batches(self, epoch: int, skip: int, steps: int) -> Iterator:
        # set directly: with several processes, the loader skip_first_batches returns for a mid-epoch resume does
        # not pass set_epoch on to the sampler, which then replayed epoch 0's order
        self.sampler.set_epoch(epoch)
        batches = self.accelerator.skip_first_batches(self.loader, skip) if skip else self.loader
        batches.set_epoch(epoch)
        return iter(batches)

    def step(self, view1: torch.Tensor | None, view2: torch.Tensor | None, step: int, *, sync: bool,
             preemption: Preemption) -> StepResult:
        losses = self.learner.step(view1, view2, backward=self.accelerator.backward)
        vec = torch.stack([losses[j].float() for j in range(len(self.learner.units))])
        world = self.accelerator.num_processes
        average([p.grad for p in self.learner.parameters() if p.requires_grad and p.grad is not None] + [vec], world)
        return StepResult(step, vec, preemption.requested(self.accelerator.device, world))


class Streamed(Replicated):
    """:class:`Replicated` over a streamed source: each process reads its own shards (see the module)."""

    def __init__(self, cfg: TrainConfig, accelerator, learner: LocalLearner, dataset):
        Strategy.__init__(self, cfg, accelerator, learner, dataset)
        self.loader = StreamLoader(dataset, cfg.batch_size // accelerator.num_processes, cfg.num_workers,
                                   accelerator.device.type == 'cuda', cfg.seed, accelerator.process_index,
                                   accelerator.device)

    def prepare(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        return self.accelerator.prepare(optimizer)

    def batches(self, epoch: int, skip: int, steps: int) -> Iterator:
        return self.loader.epoch(epoch, skip, steps)


def is_streamed(dataset) -> bool:
    """Whether a dataset is a stream (each process reads its own shards)."""
    return isinstance(dataset, IterableDataset)


def average(tensors: list[torch.Tensor], world: int) -> None:
    """Average tensors across processes in place with one all-reduce."""
    if world == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def placement_mismatch(cfg: TrainConfig, saved: list | None, current: list | None) -> str | None:
    """Why a run with stage placement ``current`` (None: no stage parallelism) cannot resume a checkpoint written
    with ``saved``, or None: stage-parallel and other checkpoints keep the optimizer state differently, and a
    pipelined run's delayed gradients belong to its placement (a synchronous one may move)."""
    if (saved is None) == (current is None) and not (cfg.pipelined and saved != current):
        return None
    return (f'cannot resume: the checkpoint was written with stage placement {saved}, this run has {current}: use '
            f'the same pipeline and placement, or a new --out-dir to start afresh')
