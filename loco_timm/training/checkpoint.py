"""Atomic training checkpoints: a crash or kill always leaves the last complete checkpoint.

A checkpoint is a folder ``<out_dir>/checkpoints/step-XXXXXXXX`` holding

* ``learner.safetensors``: the learner's state dict (encoder and decoders, BatchNorm buffers included);
* Accelerate's ``save_state`` files: optimizer state, gradient scaler and every process's RNG states (loaded back
  with ``weights_only=True``);
* ``progress.json``: the global step, the recipe and the loco-timm version;
* ``manifest.json``, written last: the size and sha256 of every other file, so a checkpoint can be verified.

It is written to ``step-XXXXXXXX.tmp`` and renamed into place once complete; older checkpoints beyond ``keep`` are
deleted only after that (Accelerate's ``total_limit`` deletes first, so it is not used), and never the newest
``keep`` intact ones. :func:`verify_checkpoint` says why a checkpoint is damaged (a truncated or altered file, a
missing one); resume, readout and export verify before they read.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..errors import ConfigError, DamagedFileError, MissingFileError
from ..files import file_digest

__all__ = ['save_checkpoint', 'latest_checkpoint', 'list_checkpoints', 'load_weights', 'read_progress',
           'resolve_checkpoint', 'verify_checkpoint']

_NAME = re.compile(r'^step-(\d{8})$')
WEIGHTS, PROGRESS, MANIFEST = 'learner.safetensors', 'progress.json', 'manifest.json'


def list_checkpoints(out_dir: str | os.PathLike) -> list[Path]:
    """Checkpoints under ``out_dir/checkpoints``, oldest first: every ``step-XXXXXXXX`` folder (the atomic rename
    puts only complete ones there, so one that lacks a file is damaged and :func:`verify_checkpoint` says so;
    temporary ``.tmp`` folders are ignored)."""
    root = Path(out_dir) / 'checkpoints'
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _NAME.match(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def _manifest(folder: Path) -> dict:
    files = sorted(p for p in folder.rglob('*') if p.is_file() and p.name != MANIFEST)
    return dict(format=1, files={p.relative_to(folder).as_posix(): dict(size=p.stat().st_size, sha256=file_digest(p))
                                 for p in files})


def verify_checkpoint(checkpoint: str | os.PathLike) -> str | None:
    """None when the checkpoint is intact, else why not (one line). A checkpoint written before manifests existed
    is checked by reading its progress and weights."""
    folder = Path(checkpoint)
    if not folder.is_dir():
        return f'{folder} is not a folder'
    manifest = folder / MANIFEST
    if not manifest.is_file():
        if not (folder / PROGRESS).is_file() or not (folder / WEIGHTS).is_file():
            return f'{MANIFEST}, {PROGRESS} or {WEIGHTS} is missing (an incomplete checkpoint)'
        try:  # an older checkpoint without a manifest
            json.loads((folder / PROGRESS).read_text())['step']
            load_file(str(folder / WEIGHTS))
        except Exception as err:  # noqa: BLE001 - any failure to read means damaged
            return f'unreadable ({type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ""})'
        return None
    try:
        files = json.loads(manifest.read_text())['files']
        files = {str(name): (int(want['size']), str(want['sha256'])) for name, want in files.items()}
        if any(Path(name).is_absolute() or '..' in Path(name).parts for name in files):
            raise ValueError('a file outside the checkpoint')
        if not {WEIGHTS, PROGRESS} <= set(files):
            raise KeyError('learner weights or progress not listed')
    except (ValueError, KeyError, TypeError, AttributeError, OSError) as err:
        return f'{MANIFEST} is unreadable ({type(err).__name__})'
    for name, (size_wanted, sha_wanted) in files.items():
        path = folder / name
        if not path.is_file():
            return f'{name} is missing'
        size = path.stat().st_size
        if size != size_wanted:
            return f'{name} has {size} bytes, its manifest says {size_wanted} (truncated or replaced)'
        if file_digest(path) != sha_wanted:
            return f'{name} differs from its manifest (sha256): the file was altered or damaged'
    return None


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
                    progress: dict, keep: int = 2, exists_ok: bool = False,
                    write: Callable[[Path], None] | None = None,
                    state: Callable[[Path], dict] | None = None) -> Path:
    """Write a checkpoint atomically (call on every process) and prune old ones; returns its folder.

    ``exists_ok``: keep an existing checkpoint of this step instead (the one a finished run was resumed from);
    otherwise one of the same step (e.g. damaged, skipped by the resume) is replaced. ``write(folder)``: every
    process writes its own files too; ``state(folder)``: the main process's learner state dict, after them
    (stage parallelism: :mod:`loco_timm.training.stage_training`)."""
    root = Path(out_dir) / 'checkpoints'
    final = root / f'step-{step:08d}'
    tmp = root / f'{final.name}.tmp'
    if exists_ok and final in list_checkpoints(out_dir):
        return final
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if write is not None:
        write(tmp)
    accelerator.wait_for_everyone()  # every process's files are written before the manifest covers them
    if accelerator.is_main_process:
        tensors = state(tmp) if state is not None else learner.state_dict()
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS))
        (tmp / PROGRESS).write_text(json.dumps(dict(progress, step=step), indent=2))
        for f in (p for p in tmp.rglob('*') if p.is_file()):
            with open(f, 'rb') as handle:
                os.fsync(handle.fileno())
        with open(tmp / MANIFEST, 'w') as handle:
            handle.write(json.dumps(_manifest(tmp), indent=1))
            handle.flush()
            os.fsync(handle.fileno())
        shutil.rmtree(final, ignore_errors=True)  # an incomplete or damaged folder of that name
        os.replace(tmp, final)
        _fsync_dir(root)
        _prune(out_dir, keep)
    accelerator.wait_for_everyone()
    return final


def _prune(out_dir: str | os.PathLike, keep: int) -> None:
    """Delete the checkpoints older than the ``keep``-th newest intact one (never an intact one among the newest
    ``keep``, whatever happened to the files since)."""
    found, intact = list_checkpoints(out_dir), 0
    for i in range(len(found) - 1, -1, -1):
        if verify_checkpoint(found[i]) is None:
            intact += 1
            if intact == keep:
                for old in found[:i]:
                    shutil.rmtree(old, ignore_errors=True)
                return


def read_progress(checkpoint: str | os.PathLike) -> dict:
    return json.loads((Path(checkpoint) / PROGRESS).read_text())


def load_weights(module: torch.nn.Module, path: str | os.PathLike) -> None:
    """Load a safetensors state dict into ``module``, naming the first mismatched keys if it does not fit. Tensors
    on the meta device (another process's, under stage parallelism) are left there."""
    state = load_file(str(path))
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = [f'{label}: {", ".join(keys[:3])}{" ..." if len(keys) > 3 else ""}'
                 for label, keys in (('missing', missing), ('unexpected', unexpected), ('wrong shape', wrong)) if keys]
        raise ConfigError(f'{path} does not fit {type(module).__name__} ({"; ".join(parts)}): use the recipe the '
                         f'checkpoint was trained with')
    released = [k for k, v in own.items() if v.device.type == 'meta']
    for k in released:
        del state[k]
    module.load_state_dict(state, strict=not released)


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A verified checkpoint folder from either itself or a run folder (then its latest checkpoint).

    Raises:
        FileNotFoundError: No checkpoint there.
        ValueError: The checkpoint is damaged: one line naming the file, the reason and the intact checkpoints.
    """
    path = Path(path)
    if path.is_dir() and (_NAME.match(path.name) or any((path / f).is_file() for f in (PROGRESS, MANIFEST))):
        checkpoint, run = path, path.parent.parent if path.parent.name == 'checkpoints' else path.parent
    else:
        checkpoint, run = latest_checkpoint(path), path
        if checkpoint is None:
            raise MissingFileError(f'no complete checkpoint in {path}: give a run folder (with checkpoints/step-*) '
                                    f'or a checkpoint folder written by `loco-timm train`')
    reason = verify_checkpoint(checkpoint)
    if reason is not None:
        intact = [c.name for c in list_checkpoints(run) if c != checkpoint and verify_checkpoint(c) is None]
        raise DamagedFileError(f'checkpoint {checkpoint} is damaged: {reason}; intact checkpoints in '
                         f'{run / "checkpoints"}: {", ".join(intact) if intact else "none"} (give one of them as '
                         f'{run / "checkpoints"}/NAME)')
    return checkpoint
