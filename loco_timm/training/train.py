"""Training with Accelerate: ``loco-timm train`` or ``accelerate launch -m loco_timm train``.

One function, :func:`train`, in Accelerate's order: accelerator, seed, data, model, optimizer and schedule,
``prepare``, resume, loop, save, summary. The learner is not wrapped in DDP (it runs several backward passes per
step); after :meth:`LocalLearner.step` the gradients and the per-unit losses of all processes are averaged with one
all-reduce. Batches are split across processes (``split_batches``), so a run's global batches and their
augmentations (drawn from seed, epoch and sample index) do not depend on the number of processes, machines or
workers; the result does where batch statistics or randomness are per process (BatchNorm without ``sync_bn``,
dropout and drop-path seeded per process), and otherwise up to float reduction order. The main process holds a lock
on the run folder; SIGTERM/SIGINT stop every process after the same step with a checkpoint
(:mod:`loco_timm.training.runlock`).
"""
from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch.utils.data import DataLoader, IterableDataset
from tqdm.auto import tqdm

from .. import models  # noqa: F401  (registers loco_* models)
from .._version import __version__
from ..config import TrainConfig, resume_keys, to_json
from ..core.learner import LocalLearner
from ..data.augment import SimCLRAugment
from ..data.crops import ViewCropSpec
from ..data.datasets import EpochSampler, build_dataset, normalization
from ..data.sources import StreamLoader, collate_encoded, decode_views
from ..errors import ConfigError, NonFiniteLossError
from .checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_weights,
    read_progress,
    save_checkpoint,
    verify_checkpoint,
)
from .factory import build_learner
from .optim import build_optimizer, build_scheduler, steps_for
from .runlock import Preempted, Preemption, lock_run
from .stage_training import StageTraining, resolve_placement

__all__ = ['train', 'NonFiniteLossError', 'machine_name']


def _check_out_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f'.write-test-{os.getpid()}'  # one per process: they start together
        probe.write_text('')
        probe.unlink(missing_ok=True)
    except OSError as err:
        raise ConfigError(f'out_dir {path} is not writable ({err.strerror}): choose another --out-dir') from None


def _average(tensors: list[torch.Tensor], world: int) -> None:
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


def _check_resume(cfg: TrainConfig, saved: dict, placement: list | None = None, stage=None) -> None:
    keys = resume_keys()
    current, default = to_json(cfg), to_json(TrainConfig())  # a key newer than the checkpoint had its default then
    diffs = [f'{k}={current[k]!r} (checkpoint: {saved.get(k, default[k])!r})' for k in keys
             if current[k] != saved.get(k, default[k])]
    if diffs:
        raise ConfigError(f'cannot resume: the recipe differs from the checkpoint\'s in {"; ".join(diffs)}: use the '
                          f'same recipe, or a new --out-dir to start afresh')
    if (placement is None) != (stage is None) or (cfg.pipelined and placement != stage.placement):
        raise ConfigError(f'cannot resume: the checkpoint was written with stage placement {placement}, this run has '
                          f'{stage.placement if stage else None}: use the same pipeline and placement, or a new '
                          f'--out-dir to start afresh')


def train(cfg: TrainConfig, resume: bool = False,
          after_backward: Callable[[int, LocalLearner], None] | None = None) -> dict:
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
    trackers = 'tensorboard' if cfg.trackers == 'tensorboard' and _has_tensorboard() else None
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, log_with=trackers, project_dir=str(out_dir),
                              dataloader_config=DataLoaderConfiguration(split_batches=True),
                              step_scheduler_with_optimizer=False)
    lock = lock_run(accelerator, out_dir)
    try:
        with Preemption() as preemption:
            return _train(cfg, resume, after_backward, accelerator, out_dir, preemption)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: TrainConfig, resume: bool, after_backward: Callable[[int, LocalLearner], None] | None,
           accelerator, out_dir: Path, preemption: Preemption) -> dict:

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
    set_seed(cfg.seed)

    crops = ViewCropSpec(cfg.image_size, tuple(cfg.crop_scale), seed=cfg.seed)
    try:
        dataset = build_dataset(cfg.dataset, 'pretrain', cfg.data_dir, cfg.image_size, cfg.subset, crops=crops,
                                splits=cfg.splits, seed=cfg.seed, batch_size=cfg.batch_size // world,
                                draft=cfg.decode_draft, encoded=cfg.decode_device)
    except (FileNotFoundError, ImportError) as err:
        raise ConfigError(str(err)) from None
    cropped = dataset.crops is not None  # the loader cut the views from the whole image (loco_timm.data.crops)
    if len(dataset) < cfg.batch_size:
        raise ConfigError(f'batch_size={cfg.batch_size} is larger than the dataset ({len(dataset)} images)')
    stream = isinstance(dataset, IterableDataset)  # each process reads its own shards (loco_timm.data.sources)
    if stream and groups > 1:
        raise ConfigError(f'{cfg.dataset} is streamed: stage parallelism reads random-access sources only (a folder, '
                          f'tars, hfds/): convert it, or leave pipeline out')
    encoded = getattr(dataset, 'encoded', False)  # JPEG bytes decoded on the device (loco_timm.data.sources.decode_views)
    pin = accelerator.device.type == 'cuda'
    if stream:
        sampler = None
        loader = StreamLoader(dataset, cfg.batch_size // world, cfg.num_workers, pin, cfg.seed,
                               accelerator.process_index, accelerator.device)
    else:
        sampler = EpochSampler(len(dataset), cfg.seed, keys=cropped)
        loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, drop_last=True,
                            num_workers=cfg.num_workers, pin_memory=pin and not encoded,
                            persistent_workers=cfg.num_workers > 0, collate_fn=collate_encoded if encoded else None)
    mean, std = normalization(cfg.dataset)
    augment = SimCLRAugment(cfg.image_size, scale=cfg.crop_scale, mean=mean, std=std)

    learner = build_learner(cfg, dataset.channels, len(dataset.classes)).to(accelerator.device)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    learner.to(memory_format=memory_format)
    stage = None
    if groups > 1:  # stage parallelism: this process keeps its stages (loco_timm.training.stage_training)
        placement = resolve_placement(cfg, learner, accelerator, cfg.batch_size // parts, dataset.channels,
                                      _saved_placement(out_dir) if resume else None)
        stage = StageTraining(cfg, learner, accelerator, placement)
        loader = stage.loader(dataset, sampler, collate_encoded if encoded else None)
    params = stage.sp.parameters() if stage else [p for p in learner.parameters() if p.requires_grad]

    optimizer = build_optimizer(learner, cfg, keep=params if stage else None)
    steps_per_epoch = len(dataset) // cfg.batch_size
    total_steps = cfg.max_steps or steps_for(cfg.epochs, steps_per_epoch)
    scheduler = build_scheduler(optimizer, total_steps, int(round(cfg.warmup_epochs * steps_per_epoch)))

    if stage is not None:
        stage.optimizer = optimizer  # its state is saved per stage group (fp16 loss scaling is refused)
    elif stream:
        optimizer = accelerator.prepare(optimizer)
    else:  # JPEG bytes stay on the CPU for the decoder, which puts its output on the device
        optimizer, loader = accelerator.prepare(optimizer, loader, device_placement=[True, not encoded])

    step = 0
    progress = dict(config=to_json(cfg), num_classes=len(dataset.classes), in_chans=dataset.channels,
                    classes=dataset.classes, version=__version__)
    if stage is not None:
        progress['placement'] = stage.placement
    saving = dict(write=stage.write, state=stage.full_state) if stage else {}
    if resume:
        if checkpoint is not None:
            checkpoint, step = _load_newest_intact(cfg, out_dir, learner, accelerator, stage)
            accelerator.print(f'resumed from {checkpoint} at step {step}')
        else:
            accelerator.print(f'no checkpoint in {out_dir}: starting from step 0')
        losses = out_dir / 'losses.jsonl'
        if accelerator.is_main_process and losses.is_file():  # drop the rows logged after the checkpoint
            kept = [line for line in losses.read_text().splitlines() if _logged_step(line) <= step]
            trimmed = losses.with_name(f'.{losses.name}.tmp')  # atomically: a kill now keeps the old curves
            trimmed.write_text(''.join(f'{line}\n' for line in kept))
            os.replace(trimmed, losses)

    start_step = step
    accelerator.init_trackers('loco', config={k: str(v) for k, v in to_json(cfg).items()})
    bar = tqdm(total=total_steps, initial=step, disable=not accelerator.is_local_main_process, desc=cfg.mode,
               dynamic_ncols=True)
    learner.train()
    data_time = step_time = 0.0
    images_seen, last = 0, {}
    start = time.perf_counter()
    while step < total_steps:
        epoch, skip = divmod(step, steps_per_epoch)
        # set directly: with several processes, the loader skip_first_batches returns for a mid-epoch resume does
        # not pass set_epoch on to the sampler, which then replayed epoch 0's order
        if stage is not None:
            batches = stage.batches(loader, epoch, skip, steps_per_epoch, encoded)
        elif stream:
            batches = loader.epoch(epoch, skip, steps_per_epoch)
        else:
            sampler.set_epoch(epoch)
            batches = accelerator.skip_first_batches(loader, skip) if skip else loader
            batches.set_epoch(epoch)
        tick = time.perf_counter()
        for batch in batches:
            view1 = view2 = None  # stage parallelism: only the first stage group reads images
            if batch is not None:
                images, _, index = batch
                if encoded:
                    images = decode_views(*images, cfg.image_size, accelerator.device)
                    index = index.to(accelerator.device)
                with torch.no_grad():
                    view1, view2 = (augment(images[:, v] if cropped else images, index, cfg.seed, epoch, v,
                                            cropped=cropped).contiguous(memory_format=memory_format)
                                    for v in (0, 1))
            torch.manual_seed(cfg.seed * 1_000_003 + step * 997 + accelerator.process_index)  # dropout, drop-path
            ready = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            if stage is None:
                with accelerator.autocast():
                    losses = learner.step(view1, view2, backward=accelerator.backward)
                loss_vec, loss_step = torch.stack([losses[j].float() for j in range(len(learner.units))]), step
                _average([p.grad for p in params if p.grad is not None] + [loss_vec], world)
            else:  # the reduction of this step's losses and stop flags is waited for one step later
                sync = (step + 1) % cfg.log_every == 0 or (step + 1) % cfg.checkpoint_every == 0 \
                    or step + 1 >= total_steps
                with accelerator.autocast():
                    reduced = stage.step(view1, view2, accelerator.backward, preemption.signum is not None, sync,
                                         step)
                loss_step, loss_vec, stop = reduced if reduced is not None else (step, None, False)
            if loss_vec is not None and not torch.isfinite(loss_vec).all():
                bad = int((~torch.isfinite(loss_vec)).nonzero()[0])
                raise NonFiniteLossError(
                    f'non-finite loss ({loss_vec[bad].item()}) in unit {bad} {learner.units[bad]} at step '
                    f'{loss_step + 1}: '
                    f'stopped every process; the last good checkpoint in {out_dir / "checkpoints"} is kept '
                    f'(lower base_lr or use mixed_precision=no)')
            if after_backward is not None:
                after_backward(step, learner)
            scheduler.step_update(step)
            optimizer.step()
            step += 1
            done = time.perf_counter()
            data_time, step_time = data_time + ready - tick, step_time + done - ready
            images_seen += cfg.batch_size
            if loss_vec is not None:
                last = {f'loss/unit{j}': v for j, v in enumerate(loss_vec.tolist())}
            if step % cfg.log_every == 0 or step == total_steps:
                lr = optimizer.param_groups[0]['lr']
                accelerator.log(dict(last, lr=lr, img_per_s=images_seen / (done - start), epoch=epoch), step=step)
                if accelerator.is_main_process:  # plain-text loss curves (trimmed to the checkpoint on resume)
                    with open(out_dir / 'losses.jsonl', 'a') as log_file:
                        log_file.write(json.dumps(dict(last, step=step, lr=lr)) + '\n')
                bar.set_postfix({k.split('/')[-1]: f'{v:.3f}' for k, v in last.items()}, refresh=False)
            bar.update(1)
            if stage is None:
                stop = preemption.requested(accelerator.device, world)
            if stop and step < total_steps:
                saved = save_checkpoint(accelerator, learner, out_dir, step, progress, cfg.keep_checkpoints, **saving)
                bar.close()
                accelerator.end_training()
                raise Preempted(f'stopped by {preemption.signal_name} after step {step} of {total_steps}: '
                                f'checkpoint {saved} written; continue with --resume')
            if step % cfg.checkpoint_every == 0 and step < total_steps:
                save_checkpoint(accelerator, learner, out_dir, step, progress, cfg.keep_checkpoints, **saving)
            if step >= total_steps:
                break
            tick = time.perf_counter()
    bar.close()
    final = save_checkpoint(accelerator, learner, out_dir, step, progress, cfg.keep_checkpoints,
                            exists_ok=step == start_step, **saving)  # a finished run resumed: its checkpoint is this one
    wall = time.perf_counter() - start
    summary = dict(steps=step, wall_seconds=round(wall, 1), checkpoint=str(final), last_losses=last,
                   img_per_s=round(images_seen / wall, 1) if wall else None,
                   loader_img_per_s=round(images_seen / data_time, 1) if data_time else None,
                   model_img_per_s=round(images_seen / step_time, 1) if step_time else None, processes=world,
                   machine=machine_name(accelerator.device))
    if accelerator.is_main_process and (step > start_step or not (out_dir / 'train_summary.json').is_file()):
        (out_dir / 'train_summary.json').write_text(json.dumps(summary, indent=2))  # not for a finished run re-read
    accelerator.print(f'trained {step} steps in {wall:.0f} s; checkpoint {final}')
    accelerator.end_training()
    return summary


def _load_newest_intact(cfg: TrainConfig, out_dir: Path, learner: LocalLearner, accelerator,
                        stage=None) -> tuple[Path, int]:
    """Load the newest checkpoint that verifies and loads, saying in one line why each newer one is skipped
    (``stage``: a :class:`~loco_timm.training.stage_training.StageTraining` loads its own part too).

    Raises:
        ConfigError: None is intact (nothing is deleted), or the recipe differs from the checkpoint's.
    """
    for checkpoint in reversed(list_checkpoints(out_dir)):
        reason = verify_checkpoint(checkpoint)
        if reason is None:
            saved = read_progress(checkpoint)
            _check_resume(cfg, saved['config'], saved.get('placement'), stage)  # the user's error, not damage
            try:
                load_weights(learner, checkpoint / 'learner.safetensors')
                accelerator.load_state(str(checkpoint))
                if stage is not None:
                    stage.load(checkpoint)
            except Exception as err:  # noqa: BLE001 - a file that verifies but does not load is damaged too
                reason = f'it does not load ({type(err).__name__}: {str(err).strip()[:200]})'.replace('\n', ' ')
        loaded = torch.tensor([1 if reason is None else 0], device=accelerator.device)
        if accelerator.num_processes > 1:  # every process resumes from the same checkpoint or none does
            dist.all_reduce(loaded, op=dist.ReduceOp.MIN)
        if loaded.item():
            return checkpoint, saved['step']
        accelerator.print(f'skipping damaged checkpoint {checkpoint}: {reason or "it did not load on every process"}')
    raise ConfigError(f'no intact checkpoint in {out_dir / "checkpoints"} to resume from (the lines above say why '
                      f'each is damaged); nothing was deleted: restore a checkpoint from a copy, or start again in '
                      f'another --out-dir')


def _saved_placement(out_dir: Path) -> list | None:
    """The stage placement of the newest checkpoint that records one (a resumed run keeps it)."""
    for checkpoint in reversed(list_checkpoints(out_dir)):
        try:
            return read_progress(checkpoint)['placement']
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def _logged_step(line: str) -> float:
    """The step of a losses.jsonl row; a damaged row counts as after any checkpoint (it is dropped on resume)."""
    try:
        return json.loads(line)['step']
    except (ValueError, KeyError, TypeError):
        return float('inf')


def _has_tensorboard() -> bool:
    try:
        import tensorboard  # noqa: F401
        return True
    except ImportError:
        return False



def machine_name(device: torch.device) -> str:
    """The accelerator's name, or the CPU's model name (``/proc/cpuinfo``) on the CPU: what a run's summary records
    as the machine that trained it."""
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
