"""Resuming a run: the newest intact checkpoint, checked against the recipe and the strategy, loaded on every process.

A checkpoint that fails its manifest or does not load is skipped with one line saying why, and the next older one is
tried; every process resumes from the same checkpoint or none does. The recipe must match the checkpoint's in every
key declared ``resume=True`` (:func:`loco_timm.config.resume_keys`); a key newer than the checkpoint counts with its
default. The plain-text loss log is cut back to the checkpoint's step, atomically.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from ..config import TrainConfig, resume_keys, to_json
from ..core.learner import LocalLearner
from ..errors import ConfigError, DamagedFileError
from .checkpoint import list_checkpoints, load_weights, read_progress, verify_checkpoint
from .strategies import Strategy

__all__ = ['check_recipe', 'load_newest_intact', 'saved_placement', 'trim_loss_log']


def check_recipe(cfg: TrainConfig, saved: dict) -> None:
    """Refuse a recipe that differs from the checkpoint's (``saved``) in a key that changes what the run trains.

    Raises:
        ConfigError: One line listing every such key with both values.
    """
    current, default = to_json(cfg), to_json(TrainConfig())  # a key newer than the checkpoint had its default then
    diffs = [f'{k}={current[k]!r} (checkpoint: {saved.get(k, default[k])!r})' for k in resume_keys()
             if current[k] != saved.get(k, default[k])]
    if diffs:
        raise ConfigError(f'cannot resume: the recipe differs from the checkpoint\'s in {"; ".join(diffs)}: use the '
                          f'same recipe, or a new --out-dir to start afresh')


def load_newest_intact(cfg: TrainConfig, out_dir: Path, learner: LocalLearner, accelerator,
                       strategy: Strategy) -> tuple[Path, int]:
    """Load the newest checkpoint that verifies and loads (the learner, Accelerate's state, the strategy's part),
    saying in one line why each newer one is skipped. Returns it and its step.

    Raises:
        ConfigError: The recipe or the strategy differs from the checkpoint's.
        DamagedFileError: No checkpoint is intact (nothing is deleted).
    """
    for checkpoint in reversed(list_checkpoints(out_dir)):
        reason = verify_checkpoint(checkpoint)
        if reason is None:
            saved = read_progress(checkpoint)
            check_recipe(cfg, saved['config'])  # the user's error, not damage
            strategy.check_resume(saved)
            try:
                load_weights(learner, checkpoint / 'learner.safetensors')
                accelerator.load_state(str(checkpoint))
                strategy.load(checkpoint)
            except Exception as err:  # noqa: BLE001 - a file that verifies but does not load is damaged too
                reason = f'it does not load ({type(err).__name__}: {str(err).strip()[:200]})'.replace('\n', ' ')
        loaded = torch.tensor([1 if reason is None else 0], device=accelerator.device)
        if accelerator.num_processes > 1:  # every process resumes from the same checkpoint or none does
            dist.all_reduce(loaded, op=dist.ReduceOp.MIN)
        if loaded.item():
            return checkpoint, saved['step']
        accelerator.print(f'skipping damaged checkpoint {checkpoint}: {reason or "it did not load on every process"}')
    raise DamagedFileError(f'no intact checkpoint in {out_dir / "checkpoints"} to resume from (the lines above say '
                           f'why each is damaged); nothing was deleted: restore a checkpoint from a copy, or start '
                           f'again in another --out-dir')


def saved_placement(out_dir: Path) -> list | None:
    """The stage placement of the newest checkpoint that records one (a resumed run keeps it)."""
    for checkpoint in reversed(list_checkpoints(out_dir)):
        try:
            return read_progress(checkpoint)['placement']
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def trim_loss_log(path: Path, step: int) -> None:
    """Drop the rows of ``losses.jsonl`` logged after ``step`` (atomically: a kill now keeps the old curves)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if _logged_step(line) <= step]
    trimmed = path.with_name(f'.{path.name}.tmp')
    trimmed.write_text(''.join(f'{line}\n' for line in kept))
    os.replace(trimmed, path)


def _logged_step(line: str) -> float:
    """The step of a losses.jsonl row; a damaged row counts as after any checkpoint (it is dropped on resume)."""
    try:
        return json.loads(line)['step']
    except (ValueError, KeyError, TypeError):
        return float('inf')
