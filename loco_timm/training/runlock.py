"""One trainer per run folder, and a clean stop on pre-emption.

* :func:`lock_run`: the main process holds an advisory lock (``flock``) on ``OUT/.lock`` while it trains; the file
  names the holder (pid, host, start time). A second trainer on the folder stops with a one-line error naming it.
  The kernel drops the lock when its process dies, so a lock left by a killed trainer is stale by construction: the
  next trainer takes it over and says whose it was.
* :class:`Preemption`: SIGTERM and SIGINT (a cluster's pre-emption notice, Ctrl-C) only set a flag; the training loop
  asks :meth:`Preemption.requested` after every step, which every process answers the same (the flags are combined
  with an all-reduce), so all of them write the checkpoint of the same step and raise :class:`Preempted`, which
  ``loco-timm train`` turns into one line and exit status 75 (``EX_TEMPFAIL``: run it again with ``--resume``).
  A second SIGINT (Ctrl-C twice) stops at once, for a trainer stuck in a collective or in data loading.
"""
from __future__ import annotations

import errno
import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate.utils import broadcast_object_list

from ..errors import PREEMPTED_EXIT, ConfigError, Preempted

__all__ = ['RunLock', 'lock_run', 'Preemption', 'Preempted', 'PREEMPTED_EXIT']

class RunLock:
    """An exclusive ``flock`` on ``out_dir/.lock``.

    Args:
        out_dir: The run folder.
    """

    def __init__(self, out_dir: str | os.PathLike):
        self.path = Path(out_dir) / '.lock'
        self.fd: int | None = None

    def acquire(self) -> str | None:
        """Take the lock. Returns a note when a killed trainer's lock was taken over.

        Raises:
            ConfigError: Another live process holds it (one line naming it).
        """
        import fcntl  # POSIX only: imported where the lock is taken, so loco_timm imports anywhere
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as err:
            raise ConfigError(f'cannot open the run lock {self.path} ({err.strerror}): make it writable, or choose '
                              f'another --out-dir') from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = self._holder(fd)
            os.close(fd)
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise ConfigError(f'cannot lock {self.path} ({err.strerror}): the file system of --out-dir does not '
                                  f'support flock; choose a local folder') from None
            who = (f'process {holder.get("pid")} on {holder.get("host")}, started {holder.get("started")}'
                   if holder else 'another process')
            raise ConfigError(f'{self.path.parent} is in use by another trainer ({who}): wait for it to finish or '
                              f'stop it, or choose another --out-dir') from None
        holder = self._holder(fd)  # read once the lock is ours: whatever it names no longer holds it
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(dict(pid=os.getpid(), host=socket.gethostname(),
                                      started=time.strftime('%Y-%m-%d %H:%M:%S'))).encode(), 0)
        os.fsync(fd)
        self.fd = fd
        if holder:
            return (f'took over the lock of process {holder.get("pid")} on {holder.get("host")} (started '
                    f'{holder.get("started")}; no longer running)')
        return None

    @staticmethod
    def _holder(fd: int) -> dict:
        try:
            text = os.pread(fd, 4096, 0).decode()
            return json.loads(text) if text.strip() else {}
        except (OSError, ValueError):
            return {}

    def release(self) -> None:
        """Empty the file (a later trainer then has nothing to take over) and drop the lock."""
        import fcntl  # POSIX only: imported where the lock is taken, so loco_timm imports anywhere
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        finally:
            os.close(self.fd)
            self.fd = None


def lock_run(accelerator, out_dir: Path) -> RunLock | None:
    """The main process locks ``out_dir``; every process raises the same :class:`ConfigError` if it is in use."""
    lock, message = None, [None]
    if accelerator.is_main_process:
        lock = RunLock(out_dir)
        try:
            note = lock.acquire()
            if note:
                print(f'{out_dir}: {note}', flush=True)
        except ConfigError as err:
            message = [str(err)]
    if accelerator.num_processes > 1:
        broadcast_object_list(message)
    if message[0] is not None:
        raise ConfigError(message[0])
    return lock


class Preemption:
    """A context in which SIGTERM and SIGINT request a stop instead of killing the process (main thread only;
    the previous handlers come back on exit)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> Preemption:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:  # Ctrl-C twice: stop now (repeated SIGTERMs, as
            # launchers forward them, still wait for the step)
            self.__exit__()
            signal.raise_signal(signum)
            return
        self.signum = signum

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else 'a stop request'

    def requested(self, device: torch.device, world: int) -> bool:
        """Whether any process got a signal (the same answer on every process)."""
        if world == 1 or not (dist.is_available() and dist.is_initialized()):
            return self.signum is not None
        flag = torch.tensor([0 if self.signum is None else self.signum], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if self.signum is None and flag.item():
            self.signum = int(flag.item())
        return bool(flag.item())
