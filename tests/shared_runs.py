"""Runs shared by the whole test run and the helpers around them (the fixtures are in conftest.py).

A shared run is built under a file lock in a folder that every pytest-xdist worker of this pytest invocation sees (the
parent of the workers' base temporary folders), so it is trained once per test run, not once per test, module or
worker. Tests read a shared run and never change it: a test that damages, resumes or reads out a run works on its own
copy (:func:`copy_run`).

Tests that start several processes at once (``accelerate launch`` with 2-4 processes, gloo process groups) are
marked :data:`PROCESSES`. With pytest-xdist, ``--dist loadgroup`` (``scripts/run.sh test`` passes it) gives them all
to one worker, one after another: two single-threaded ranks beside the other worker's test share the two cores. A
test that starts more processes than there are cores is also marked :data:`ALONE` and has the machine to itself
(conftest.py): the other worker finishes the test it runs and waits, rather than adding to an oversubscribed gloo
process group, which waits for its descheduled members many times over.
"""
import os
import shutil
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from filelock import FileLock

PROCESSES = pytest.mark.xdist_group('processes')  # several processes at once: one such test at a time
ALONE = pytest.mark.alone  # more processes than cores: nothing beside it


def shared_build(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]) -> Path:
    """``build(folder)`` once per test run; every worker gets the same folder. A failed build leaves nothing that
    counts as built: the next test that asks for it builds it again (and fails with its own message)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get('PYTEST_XDIST_WORKER'):
        root = root.parent  # pytest-N/, above each worker's pytest-N/popen-gwK/
    shared = root / 'shared'
    shared.mkdir(exist_ok=True)
    folder, done = shared / name, shared / f'{name}.done'
    with FileLock(str(shared / f'{name}.lock')):
        if not done.exists():
            if folder.exists():
                shutil.rmtree(folder)
            build(folder)
            done.touch()
    return folder


def copy_run(run: Path, tmp_path: Path, name: str = 'run') -> Path:
    """A test's own copy of a shared run, to damage, resume or read out."""
    target = tmp_path / name
    shutil.copytree(run, target)
    return target


@contextmanager
def in_process(threads: int = 1):
    """Train or read out in the test process as a fresh CPU process with ``OMP_NUM_THREADS=threads`` would: that many
    intra-op threads, ``ACCELERATE_USE_CPU=1`` (as the tests' launches set it), and no Accelerate state left by an
    earlier in-process run (its mixed precision is fixed once set). Restores the test process's thread count and
    environment."""
    from accelerate.state import AcceleratorState, GradientState

    def fresh_state():
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    before, use_cpu = torch.get_num_threads(), os.environ.get('ACCELERATE_USE_CPU')
    fresh_state()
    torch.set_num_threads(threads)
    os.environ['ACCELERATE_USE_CPU'] = '1'
    try:
        yield
    finally:
        torch.set_num_threads(before)
        if use_cpu is None:
            del os.environ['ACCELERATE_USE_CPU']
        else:
            os.environ['ACCELERATE_USE_CPU'] = use_cpu
        fresh_state()
