"""Atomic training checkpoints: a crash or kill always leaves the last complete checkpoint.

A checkpoint is a folder ``<out_dir>/checkpoints/step-XXXXXXXX`` holding

* ``learner.safetensors``: the learner's state dict (encoder and decoders, BatchNorm buffers included);
* Accelerate's ``save_state`` files: optimizer state, gradient scaler and every process's RNG states (loaded back
  with ``weights_only=True``);
* ``progress.json``: the global step, the recipe and the loco-timm version.

It is written to ``step-XXXXXXXX.tmp`` and renamed into place once complete; older checkpoints beyond ``keep`` are
deleted only after that (Accelerate's ``total_limit`` deletes first, so it is not used).
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

__all__ = ['save_checkpoint', 'latest_checkpoint', 'list_checkpoints', 'load_weights', 'read_progress',
           'resolve_checkpoint']

_NAME = re.compile(r'^step-(\d{8})$')
WEIGHTS, PROGRESS = 'learner.safetensors', 'progress.json'


def list_checkpoints(out_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``out_dir/checkpoints``, oldest first (temporary folders are ignored)."""
    root = Path(out_dir) / 'checkpoints'
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _NAME.match(p.name) and (p / PROGRESS).is_file() and (p / WEIGHTS).is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(accelerator: Any, learner: torch.nn.Module, out_dir: str | os.PathLike, step: int,
                    progress: dict, keep: int = 2) -> Path:
    """Write a checkpoint atomically (call on every process) and prune old ones; returns its folder."""
    root = Path(out_dir) / 'checkpoints'
    final = root / f'step-{step:08d}'
    tmp = root / f'{final.name}.tmp'
    if final in list_checkpoints(out_dir):  # e.g. a finished run resumed: that step is saved already
        return final
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        state = {k: v.detach().cpu().contiguous() for k, v in learner.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS))
        (tmp / PROGRESS).write_text(json.dumps(dict(progress, step=step), indent=2))
        for f in tmp.iterdir():
            with open(f, 'rb') as handle:
                os.fsync(handle.fileno())
        shutil.rmtree(final, ignore_errors=True)  # an incomplete folder of that name (no progress.json)
        os.replace(tmp, final)
        _fsync_dir(root)
        for old in list_checkpoints(out_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def read_progress(checkpoint: str | os.PathLike) -> dict:
    return json.loads((Path(checkpoint) / PROGRESS).read_text())


def load_weights(module: torch.nn.Module, path: str | os.PathLike) -> None:
    """Load a safetensors state dict into ``module``, naming the first mismatched keys if it does not fit."""
    state = load_file(str(path))
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = [f'{label}: {", ".join(keys[:3])}{" ..." if len(keys) > 3 else ""}'
                 for label, keys in (('missing', missing), ('unexpected', unexpected), ('wrong shape', wrong)) if keys]
        raise ValueError(f'{path} does not fit {type(module).__name__} ({"; ".join(parts)}): use the recipe the '
                         f'checkpoint was trained with')
    module.load_state_dict(state)


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint folder from either itself or a run folder (then its latest complete checkpoint)."""
    path = Path(path)
    if (path / PROGRESS).is_file() and (path / WEIGHTS).is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise FileNotFoundError(f'no complete checkpoint in {path}: give a run folder (with checkpoints/step-*) or '
                                f'a checkpoint folder written by `loco-timm train`')
    return latest
