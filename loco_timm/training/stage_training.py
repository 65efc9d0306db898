"""Stage parallelism in ``loco-timm train``: the recipe keys ``pipeline`` (stage groups P), ``placement`` and
``pipelined`` (:mod:`loco_timm.training.stage_parallel`).

The processes form a grid of P stage groups x D replicas (``accelerate launch --num_processes`` P x D; global rank =
replica x P + stage group). Process ``(d, p)`` holds the stages of ``placement[p]``, their units' decoders and the
optimizer state of those parameters; the first stage group's process of replica ``d`` alone loads images, share ``d`` of
every global batch (:class:`~loco_timm.data.datasets.ShareSampler`); gradients are averaged over the D replicas of a
stage group, and NT-Xent gathers its negatives over them.

Placement: :func:`~loco_timm.training.placement.resolve_placement` (the recipe's, a resumed run's, or the measured
balance of the stages' step times).

The per-step losses and the stop flag (SIGTERM/SIGINT) are reduced over all processes without waiting: a step reads the
previous step's (:meth:`StageParallelTraining.step`), so the processes of a pipeline are not locked to each other every
step; a step that logs, checkpoints or ends the run waits for its own.

Checkpoints stay whole-model, in the usual format: the replica-0 process of each stage group writes its tensors and
its optimizer state by parameter name (safetensors), every process its settled delayed gradient (pipelined:
:meth:`~loco_timm.training.stage_parallel.StageParallel.settle`), and the main process merges the tensors into
``learner.safetensors`` (with those no process trains, e.g. the classifier, kept from the start). A resume loads each
process's part by name.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from ..config import TrainConfig
from ..core.learner import LocalLearner
from ..data.datasets import EpochSampler, ShareSampler
from ..data.sources import collate_encoded
from ..errors import ConfigError, DamagedFileError
from .runlock import Preemption
from .stage_parallel import StageParallel
from .strategies import StepResult, Strategy, placement_mismatch

__all__ = ['StageParallelTraining']

PART, OPTIMIZER, DELAYED = 'part-{}.safetensors', 'optimizer-{}.safetensors', 'delayed-{}.safetensors'


class StageParallelTraining(Strategy):
    """One process's part of a stage-parallel training run: the :class:`~loco_timm.training.strategies.Strategy` of
    the recipe keys ``pipeline``, ``placement`` and ``pipelined`` (see the module).

    Args:
        cfg: The recipe.
        accelerator: The run's Accelerator (its processes form the grid).
        learner: The whole learner, built identically on every process; this process's part is kept.
        dataset: The pre-training dataset (random access; the first stage group reads it).
        placement: :func:`~loco_timm.training.placement.resolve_placement`.
    """

    def __init__(self, cfg: TrainConfig, accelerator, learner: LocalLearner, dataset, placement: list[list[int]]):
        super().__init__(cfg, accelerator, learner, dataset)
        world, parts = accelerator.num_processes, len(placement)
        self.replicas = world // parts
        self.replica, self.index = divmod(accelerator.process_index, parts)
        d_range, p_range = range(self.replicas), range(parts)
        # every process creates every group, in the same order
        pipelines = [dist.new_group([d * parts + p for p in p_range]) for d in d_range] if self.replicas > 1 else [None]
        gathers = [dist.new_group([d * parts + p for d in d_range]) for p in p_range] if self.replicas > 1 else None
        self.loss_group = dist.new_group(list(range(world)))
        start = learner.state_dict() if accelerator.is_main_process else {}
        self.sp = StageParallel(learner, placement, group=pipelines[self.replica],
                                gather_group=gathers[self.index] if gathers else None, pipelined=cfg.pipelined)
        held = [k for k, v in learner.state_dict().items() if v.device.type != 'meta']
        everyone = [None] * world
        dist.all_gather_object(everyone, held)
        trained = set().union(*everyone)
        self.untrained = {k: v.detach().cpu().clone() for k, v in start.items() if k not in trained}
        self.placement, self.first, self.num_units = placement, self.index == 0, len(learner.units)
        self._inflight: list = []  # (step, loss sums, stop flag, works) of reductions not yet waited for
        self.optimizer = None
        self.loader = self._loader() if self.first else None

    def _loader(self) -> DataLoader:
        """The first stage group's loader: share ``replica`` of every global batch (:class:`ShareSampler`)."""
        cfg, sampler = self.cfg, EpochSampler(len(self.dataset), self.cfg.seed, keys=self.dataset.crops is not None)
        self.batch_sampler = ShareSampler(sampler, cfg.batch_size, self.replica, self.replicas)
        return DataLoader(self.dataset, batch_sampler=self.batch_sampler, num_workers=cfg.num_workers,
                          pin_memory=self.accelerator.device.type == 'cuda' and not self.encoded,
                          persistent_workers=cfg.num_workers > 0, collate_fn=collate_encoded if self.encoded else None)

    def trained_parameters(self) -> list[torch.nn.Parameter]:
        return self.sp.parameters()

    def prepare(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        self.optimizer = optimizer  # its state is saved per stage group (fp16 loss scaling is refused)
        return optimizer

    def batches(self, epoch: int, skip: int, steps: int) -> Iterator:
        """An epoch's batches from global batch ``skip`` on (on the device), or None per step off the first group."""
        if self.loader is None:
            yield from [None] * (steps - skip)
            return
        self.batch_sampler.set_epoch(epoch, skip)
        device = self.accelerator.device
        for images, labels, index in self.loader:
            yield (images, labels, index) if self.encoded else (images.to(device, non_blocking=True), labels,
                                                                index.to(device, non_blocking=True))

    def step(self, view1: torch.Tensor | None, view2: torch.Tensor | None, step: int, *, sync: bool,
             preemption: Preemption) -> StepResult:
        """One step (views on the first stage group only), gradients averaged over the replicas; then the reductions
        of losses and stop flags that are ready: those of the newest step whose reduction completed (this one when
        ``sync``; none, before the first has), the losses averaged over replicas and whether any process was
        signalled by then."""
        losses = self.sp.step(view1, view2, backward=self.accelerator.backward, device=self.accelerator.device)
        self.sp.average_gradients()
        vec = torch.zeros(self.num_units, device=self.accelerator.device)
        for j, loss in losses.items():
            vec[j] = loss.float()
        flag = torch.tensor([0.0 if preemption.signum is None else 1.0], device=self.accelerator.device)
        works = [dist.all_reduce(vec, group=self.loss_group, async_op=True),
                 dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.loss_group, async_op=True)]
        self._inflight.append((step, vec, flag, works))
        done = StepResult(step, None, False)
        while self._inflight and (sync or len(self._inflight) > 1):
            at, vec, flag, works = self._inflight.pop(0)
            for work in works:
                work.wait()
            done = StepResult(at, vec / self.replicas, bool(flag.item()))
            if not torch.isfinite(vec).all():  # the earliest non-finite step is the one to report (every process)
                break
        return done

    def save_hooks(self) -> dict:
        return dict(write=self.write, state=self.full_state)

    def progress(self) -> dict:
        return dict(placement=self.placement)

    def check_resume(self, saved: dict) -> None:
        problem = placement_mismatch(self.cfg, saved.get('placement'), self.placement)
        if problem:
            raise ConfigError(problem)


    def drain(self) -> None:
        """Wait for the reductions still in flight."""
        for _, _, _, works in self._inflight:
            for work in works:
                work.wait()
        self._inflight = []

    def write(self, folder: Path) -> None:
        """Every process: settle the delayed gradient and write this process's files into the checkpoint folder."""
        self.drain()
        with self.accelerator.autocast():
            self.sp.settle(self.accelerator.device)
        rank = self.accelerator.process_index
        if self.replica == 0:
            save_file({k: v.detach().cpu().contiguous() for k, v in self.learner.state_dict().items()
                       if v.device.type != 'meta'}, str(folder / PART.format(self.index)))
            tensors, meta = _optimizer_state(self.optimizer, self.sp.named_parameters())
            save_file(tensors, str(folder / OPTIMIZER.format(self.index)), metadata=meta)
        if self.cfg.pipelined:
            save_file({k: v.cpu().contiguous() for k, v in self.sp.delayed_state().items()},
                      str(folder / DELAYED.format(rank)))

    def full_state(self, folder: Path) -> dict[str, torch.Tensor]:
        """Main process: the whole learner's tensors from the stage groups' parts (the part files are removed)."""
        state = dict(self.untrained)
        for p in range(len(self.placement)):
            part = folder / PART.format(p)
            state.update(load_file(str(part)))
            part.unlink()
        order = list(self.learner.state_dict())
        return {k: state[k] for k in order}

    def load(self, checkpoint: Path) -> None:
        """Every process: its optimizer state and delayed gradient, and (main) the untrained tensors."""
        files = sorted(checkpoint.glob(OPTIMIZER.format('*')))
        if not files:
            raise DamagedFileError(f'{checkpoint} has no {OPTIMIZER.format("*")} (not written by stage-parallel '
                                   f'training)')
        tensors, scalars = {}, {}
        for path in files:  # by parameter name: a synchronous run may resume on another placement
            with safe_open(str(path), 'pt', device='cpu') as f:
                scalars.update(json.loads(f.metadata()['scalars']))
                tensors.update({k: f.get_tensor(k) for k in f.keys()})
        _load_optimizer_state(self.optimizer, self.sp.named_parameters(), tensors, scalars)
        if self.cfg.pipelined:
            self.sp.load_delayed(load_file(str(checkpoint / DELAYED.format(self.accelerator.process_index))))
        if self.untrained:
            weights = load_file(str(checkpoint / 'learner.safetensors'))
            self.untrained = {k: weights[k] for k in self.untrained}


def _optimizer_state(optimizer, named) -> tuple[dict, dict]:
    """An optimizer's per-parameter state by parameter name: tensors, and the other values as JSON metadata."""
    ids = [id(p) for group in optimizer.param_groups for p in group['params']]
    names = {id(p): name for name, p in named}
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, state in sd['state'].items():
        name = names[ids[index]]
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f'{name}/{key}'] = value.detach().cpu().contiguous()
            else:
                scalars[f'{name}/{key}'] = value
    return tensors, {'scalars': json.dumps(scalars)}


def _load_optimizer_state(optimizer, named, tensors: dict, scalars: dict) -> None:
    """The inverse of :func:`_optimizer_state` for this optimizer's parameters (its groups' settings come from the
    recipe, the learning rate from the schedule)."""
    names = {id(p): name for name, p in named}
    order = [names[id(p)] for group in optimizer.param_groups for p in group['params']]
    state = {}
    for index, name in enumerate(order):
        entry = {k.split('/', 1)[1]: v for k, v in tensors.items() if k.split('/', 1)[0] == name}
        entry.update({k.split('/', 1)[1]: v for k, v in scalars.items() if k.split('/', 1)[0] == name})
        if entry:
            state[index] = entry
    optimizer.load_state_dict(dict(state=state, param_groups=optimizer.state_dict()['param_groups']))
    for p, entry in optimizer.state.items():  # in the parameter's memory layout (e.g. channels_last), as before
        for key, value in entry.items():
            if torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                entry[key] = torch.empty_like(p, dtype=value.dtype).copy_(value)
