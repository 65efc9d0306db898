"""Training with Accelerate: ``loco-timm train`` or ``accelerate launch -m loco_timm train``.

One training function in Accelerate's fixed order: accelerator, seed, data, model, strategy, optimizer and schedule,
``prepare``, resume, the loop, save, summary. What differs between one process or data parallelism, a streamed
source and stage parallelism is a :class:`~loco_timm.training.strategies.Strategy` chosen up front
(:func:`choose_strategy`): the loop below has no branch on the way of training.

The learner is not wrapped in DDP (it runs several backward passes per step); the strategy averages the gradients
and the per-unit losses of all processes. Batches are split across processes (``split_batches``), so a run's global
batches and their augmentations (drawn from seed, epoch and sample index) do not depend on the number of processes,
machines or workers; the result does where batch statistics or randomness are per process (BatchNorm without
``sync_bn``, dropout and drop-path seeded per process), and otherwise up to float reduction order. The main process
holds a lock on the run folder; SIGTERM/SIGINT stop every process after the same step with a checkpoint
(:mod:`loco_timm.training.runlock`).
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from tqdm.auto import tqdm

from .. import models  # noqa: F401  (registers loco_* models)
from .._version import __version__
from ..config import TrainConfig, to_json
from ..core.learner import LocalLearner
from ..data.augment import SimCLRAugment
from ..data.crops import ViewCropSpec
from ..data.datasets import build_dataset, normalization
from ..data.sources import decode_views
from ..errors import ConfigError, NonFiniteLossError, Preempted
from .checkpoint import latest_checkpoint, save_checkpoint
from .factory import build_learner
from .optim import build_optimizer, build_scheduler, steps_for
from .placement import resolve_placement
from .report import Meter, append_loss_row, machine_name, tracker
from .resume import load_newest_intact, saved_placement, trim_loss_log
from .runlock import Preemption, lock_run
from .stage_training import StageParallelTraining
from .strategies import Replicated, StepResult, Strategy, Streamed, is_streamed

__all__ = ['train', 'choose_strategy', 'machine_name']

AfterBackward = Callable[[int, LocalLearner], None]


def train(cfg: TrainConfig, *, resume: bool = False, after_backward: AfterBackward | None = None) -> dict:
    """Pre-train ``cfg.backbone`` with ``cfg.mode`` and write checkpoints to ``cfg.out_dir``.

    Args:
        cfg: The recipe.
        resume: Continue from the latest complete checkpoint in ``cfg.out_dir`` (mid-epoch included).
        after_backward: Called as ``fn(step, learner)`` after the gradients of a step are averaged, before the
            optimizer step (for tests and diagnostics).

    Returns:
        Summary: steps, wall time, throughput, last per-unit losses, final checkpoint.

    Raises:
        ConfigError: Bad recipe or data, or the run folder is in use by another trainer. NonFiniteLossError: a loss
            became NaN/inf (the last checkpoint is kept). Preempted: SIGTERM or SIGINT arrived; the step was finished
            and a checkpoint written (every process raises it after the same step).
    """
    out_dir = Path(cfg.out_dir)
    _check_out_dir(out_dir)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, log_with=tracker(cfg.trackers),
                              project_dir=str(out_dir), dataloader_config=DataLoaderConfiguration(split_batches=True),
                              step_scheduler_with_optimizer=False)
    lock = lock_run(accelerator, out_dir)
    try:
        with Preemption() as preemption:
            return _train(cfg, resume, after_backward, accelerator, out_dir, preemption)
    finally:
        if lock is not None:
            lock.release()


@dataclass
class _Run:
    """What the loop works with, set up in :func:`_train`'s fixed order."""
    cfg: TrainConfig
    accelerator: Any
    out_dir: Path
    dataset: Any
    learner: LocalLearner
    strategy: Strategy
    optimizer: torch.optim.Optimizer
    scheduler: Any
    steps_per_epoch: int
    total_steps: int
    progress: dict


def _train(cfg: TrainConfig, resume: bool, after_backward: AfterBackward | None, accelerator, out_dir: Path,
           preemption: Preemption) -> dict:
    checkpoint = _check_launch(cfg, accelerator, out_dir, resume)
    set_seed(cfg.seed)
    dataset = _pretraining_data(cfg, accelerator.num_processes)
    learner = build_learner(cfg, dataset.channels, len(dataset.classes)).to(accelerator.device)
    learner.to(memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format)
    strategy = choose_strategy(cfg, accelerator, learner, dataset, saved_placement(out_dir) if resume else None)
    optimizer = build_optimizer(learner, cfg, keep=strategy.trained_parameters())
    steps_per_epoch = len(dataset) // cfg.batch_size
    total_steps = cfg.max_steps or steps_for(cfg.epochs, steps_per_epoch)
    scheduler = build_scheduler(optimizer, total_steps, int(round(cfg.warmup_epochs * steps_per_epoch)))
    optimizer = strategy.prepare(optimizer)
    progress = dict(config=to_json(cfg), num_classes=len(dataset.classes), in_chans=dataset.channels,
                    classes=dataset.classes, version=__version__, **strategy.progress())
    run = _Run(cfg, accelerator, out_dir, dataset, learner, strategy, optimizer, scheduler, steps_per_epoch,
               total_steps, progress)
    start = _resume(run, checkpoint) if resume else 0
    accelerator.init_trackers('loco', config={k: str(v) for k, v in to_json(cfg).items()})
    step, meter = _loop(run, start, after_backward, preemption)
    return _finish(run, step, start, meter)


def _check_launch(cfg: TrainConfig, accelerator, out_dir: Path, resume: bool) -> Path | None:
    """The run folder's latest checkpoint, after checking the folder, the process grid and the batch split."""
    checkpoint = latest_checkpoint(out_dir)
    if checkpoint is not None and not resume:
        raise ConfigError(f'{out_dir} already holds checkpoints ({checkpoint.name}): pass --resume to continue that '
                          f'run, or choose a new --out-dir')
    world, groups = accelerator.num_processes, cfg.stage_groups
    if world % groups:
        raise ConfigError(f'{groups} stage groups need a multiple of {groups} processes (P x replicas), not {world}: '
                          f'launch with --num_processes {groups}, or change pipeline')
    parts = world // groups  # processes that share each global batch
    if cfg.batch_size % parts:
        raise ConfigError(f'batch_size={cfg.batch_size} is not divisible by the {parts} processes: use a multiple '
                          f'of {parts}')
    if cfg.sync_bn and world > 1 and accelerator.device.type != 'cuda':
        raise ConfigError('sync_bn needs CUDA devices: leave it off on CPU (BatchNorm statistics stay per process)')
    return checkpoint


def _check_out_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f'.write-test-{os.getpid()}'  # one per process: they start together
        probe.write_text('')
        probe.unlink(missing_ok=True)
    except OSError as err:
        raise ConfigError(f'out_dir {path} is not writable ({err.strerror}): choose another --out-dir') from None


def _pretraining_data(cfg: TrainConfig, world: int):
    """The pre-training split; a source that crops in the loader gets the views' crop spec."""
    crops = ViewCropSpec(cfg.image_size, tuple(cfg.crop_scale), seed=cfg.seed)
    dataset = build_dataset(cfg.dataset, 'pretrain', cfg.data_dir, cfg.image_size, cfg.subset, crops=crops,
                            splits=cfg.splits, seed=cfg.seed, batch_size=cfg.batch_size // world,
                            draft=cfg.decode_draft, encoded=cfg.decode_device)
    if len(dataset) < cfg.batch_size:
        raise ConfigError(f'batch_size={cfg.batch_size} is larger than the dataset ({len(dataset)} images)')
    return dataset


def choose_strategy(cfg: TrainConfig, accelerator, learner: LocalLearner, dataset,
                    saved: list | None = None) -> Strategy:
    """The way this run trains: stage parallelism where the recipe asks for stage groups (the placement of the
    recipe, of a resumed run's checkpoint (``saved``), or measured), else data parallelism over a stream or a
    random-access dataset (one process is its special case)."""
    if cfg.stage_groups > 1:
        if is_streamed(dataset):
            raise ConfigError(f'{cfg.dataset} is streamed: stage parallelism reads random-access sources only (a '
                              f'folder, tars, hfds/): convert it, or leave pipeline out')
        batch = cfg.batch_size // (accelerator.num_processes // cfg.stage_groups)
        placement = resolve_placement(cfg, learner, accelerator, batch, dataset.channels, saved)
        return StageParallelTraining(cfg, accelerator, learner, dataset, placement)
    return (Streamed if is_streamed(dataset) else Replicated)(cfg, accelerator, learner, dataset)


def _resume(run: _Run, checkpoint: Path | None) -> int:
    """Load the newest intact checkpoint (if any) and cut the loss log back to it; returns its step."""
    step = 0
    if checkpoint is not None:
        checkpoint, step = load_newest_intact(run.cfg, run.out_dir, run.learner, run.accelerator, run.strategy)
        run.accelerator.print(f'resumed from {checkpoint} at step {step}')
    else:
        run.accelerator.print(f'no checkpoint in {run.out_dir}: starting from step 0')
    if run.accelerator.is_main_process:
        trim_loss_log(run.out_dir / 'losses.jsonl', step)
    return step


class _Views:
    """A batch's two augmented views on the device (None, None for a process that loads no images)."""

    def __init__(self, cfg: TrainConfig, dataset, device: torch.device):
        mean, std = normalization(cfg.dataset)
        self.augment = SimCLRAugment(cfg.image_size, scale=cfg.crop_scale, mean=mean, std=std)
        self.cfg, self.device = cfg, device
        self.cropped = dataset.crops is not None  # the loader cut the views from the whole image (data.crops)
        self.encoded = getattr(dataset, 'encoded', False)  # JPEG bytes, decoded on the device (data.sources)
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format

    @torch.no_grad()
    def __call__(self, batch, epoch: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if batch is None:
            return None, None
        images, _, index = batch
        if self.encoded:
            images = decode_views(*images, self.cfg.image_size, self.device)
            index = index.to(self.device)
        return tuple(self.augment(images[:, v] if self.cropped else images, index, self.cfg.seed, epoch, v,
                                  cropped=self.cropped).contiguous(memory_format=self.memory_format) for v in (0, 1))


def _loop(run: _Run, step: int, after_backward: AfterBackward | None, preemption: Preemption) -> tuple[int, Meter]:
    """Steps until the budget: each one's views, its strategy step, the optimizer step, logs, checkpoints, stop."""
    cfg, accelerator = run.cfg, run.accelerator
    views, meter = _Views(cfg, run.dataset, accelerator.device), Meter()
    bar = tqdm(total=run.total_steps, initial=step, disable=not accelerator.is_local_main_process, desc=cfg.mode,
               dynamic_ncols=True)
    run.learner.train()
    while step < run.total_steps:
        epoch, skip = divmod(step, run.steps_per_epoch)
        tick = time.perf_counter()
        for batch in run.strategy.batches(epoch, skip, run.steps_per_epoch):
            view1, view2 = views(batch, epoch)
            torch.manual_seed(cfg.seed * 1_000_003 + step * 997 + accelerator.process_index)  # dropout, drop-path
            ready = time.perf_counter()
            result = _step(run, view1, view2, step, preemption, after_backward)
            step += 1
            meter.add(tick, ready, time.perf_counter(), cfg.batch_size, result.losses)
            _report(run, bar, step, epoch, meter)
            if result.stop and step < run.total_steps:
                saved = _save(run, step)
                bar.close()
                accelerator.end_training()
                raise Preempted(f'stopped by {preemption.signal_name} after step {step} of {run.total_steps}: '
                                f'checkpoint {saved} written; continue with --resume')
            if step % cfg.checkpoint_every == 0 and step < run.total_steps:
                _save(run, step)
            if step >= run.total_steps:
                break
            tick = time.perf_counter()
    bar.close()
    return step, meter


def _step(run: _Run, view1, view2, step: int, preemption: Preemption,
          after_backward: AfterBackward | None) -> StepResult:
    """One optimizer step: the strategy's forward and backward passes, the finiteness check, the update."""
    cfg = run.cfg
    sync = (step + 1) % cfg.log_every == 0 or (step + 1) % cfg.checkpoint_every == 0 or step + 1 >= run.total_steps
    run.optimizer.zero_grad(set_to_none=True)
    with run.accelerator.autocast():
        result = run.strategy.step(view1, view2, step, sync=sync, preemption=preemption)
    if result.losses is not None and not torch.isfinite(result.losses).all():
        bad = int((~torch.isfinite(result.losses)).nonzero()[0])
        raise NonFiniteLossError(
            f'non-finite loss ({result.losses[bad].item()}) in unit {bad} {run.learner.units[bad]} at step '
            f'{result.step + 1}: stopped every process; the last good checkpoint in {run.out_dir / "checkpoints"} '
            f'is kept (lower base_lr or use mixed_precision=no)')
    if after_backward is not None:
        after_backward(step, run.learner)
    run.scheduler.step_update(step)
    run.optimizer.step()
    return result


def _report(run: _Run, bar, step: int, epoch: int, meter: Meter) -> None:
    """Every ``log_every`` steps and at the end: the tracker, ``losses.jsonl`` and the progress bar."""
    if step % run.cfg.log_every == 0 or step == run.total_steps:
        lr = run.optimizer.param_groups[0]['lr']
        run.accelerator.log(dict(meter.last, lr=lr, img_per_s=meter.images / (time.perf_counter() - meter.start),
                                 epoch=epoch), step=step)
        if run.accelerator.is_main_process:  # plain-text loss curves (trimmed to the checkpoint on resume)
            append_loss_row(run.out_dir / 'losses.jsonl', dict(meter.last, step=step, lr=lr))
        bar.set_postfix({k.split('/')[-1]: f'{v:.3f}' for k, v in meter.last.items()}, refresh=False)
    bar.update(1)


def _save(run: _Run, step: int, **kwargs: Any) -> Path:
    return save_checkpoint(run.accelerator, run.learner, run.out_dir, step, run.progress, run.cfg.keep_checkpoints,
                           **kwargs, **run.strategy.save_hooks())


def _finish(run: _Run, step: int, start: int, meter: Meter) -> dict:
    """The final checkpoint (a finished run resumed keeps its own) and ``train_summary.json``."""
    final = _save(run, step, exists_ok=step == start)
    summary = meter.summary(step, final, run.accelerator.num_processes, run.accelerator.device)
    summary_path = run.out_dir / 'train_summary.json'
    if run.accelerator.is_main_process and (step > start or not summary_path.is_file()):
        summary_path.write_text(json.dumps(summary, indent=2))  # not for a finished run read again
    run.accelerator.print(f'trained {step} steps in {summary["wall_seconds"]:.0f} s; checkpoint {final}')
    run.accelerator.end_training()
    return summary
