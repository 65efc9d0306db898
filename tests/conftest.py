"""What the whole test run shares (see shared_runs.py): runs trained once per test run, not once per test, module
or pytest-xdist worker; and the scheduling of tests that start several processes under pytest-xdist."""
import fcntl
import os
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from shared_runs import shared_build
from zoo_common import FMNIST, TINY_READOUT, TINY_TRAIN, cli

from loco_timm.data.datasets import find_fashion_mnist


def pytest_configure(config):
    """A pytest-xdist worker per core computes on one thread unless OMP_NUM_THREADS says otherwise, as
    `scripts/run.sh test` sets it: two OpenMP teams on two cores wait for their descheduled members (the fast tier took
    4:15 instead of 0:56 on 2 cores)."""
    if os.environ.get('PYTEST_XDIST_WORKER') and 'OMP_NUM_THREADS' not in os.environ:
        os.environ['OMP_NUM_THREADS'] = '1'  # and the processes tests start
        torch.set_num_threads(1)


def _cli_ok(*args):
    result = cli(*args, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope='session')
def fmnist_run(tmp_path_factory) -> Path:
    """The main job's tag trained briefly and read out through the command line (as `scripts/run.sh main` does),
    once per test run: 6 steps with checkpoints at steps 3 and 6, then the readout (readout.json,
    readout_head.safetensors, readout.png). Read it; copy it (shared_runs.copy_run) to change it."""
    if find_fashion_mnist() is None:
        pytest.skip('Fashion-MNIST not installed')

    def build(run):
        _cli_ok('train', '--config', FMNIST, '--out-dir', run, *TINY_TRAIN)
        _cli_ok('readout', run, '--config', FMNIST, *TINY_READOUT)
    return shared_build(tmp_path_factory, 'fmnist-run', build)


def _groups(item) -> list[str]:
    return sorted({str(m.args[0] if m.args else m.kwargs.get('name', 'default'))
                   for m in item.iter_markers('xdist_group')})


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """--dist loadgroup: pytest-xdist names each grouped test ``NODEID@GROUP`` for its scheduler, by assigning
    ``item._nodeid``; pytest 9 derives the node id from ``item._id`` instead, so that assignment is lost and the
    groups are silently ignored. Name them so here where xdist's naming did not take."""
    if not getattr(config.option, 'loadgroup', False):
        return
    for item in items:
        groups = _groups(item)
        suffix = '@' + '_'.join(groups)
        if groups and not item.nodeid.endswith(suffix):
            from _pytest.nodeid import NodeId  # pytest >= 9, where _nodeid is not read
            item._id = NodeId.parse(item.nodeid + suffix)


@contextmanager
def _flock(path: Path, mode: int):
    with open(path, 'a') as f:
        fcntl.flock(f, mode)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextmanager
def _machine(config, alone: bool):
    """Between the pytest-xdist workers of this run: an ALONE test runs alone (an exclusive lock), any other test
    beside any other (a shared lock). A waiting ALONE test holds the turnstile, so the other worker's next test waits
    for it instead of overtaking it."""
    basetemp = getattr(config.option, 'basetemp', None)
    if not os.environ.get('PYTEST_XDIST_WORKER') or not basetemp:
        yield  # one process runs the tests: nothing beside them
        return
    root = Path(basetemp).parent  # shared by the workers of this run
    turnstile, machine = root / 'machine.turnstile', root / 'machine.lock'
    if alone:
        with _flock(turnstile, fcntl.LOCK_EX), _flock(machine, fcntl.LOCK_EX):
            yield
    else:
        with _flock(turnstile, fcntl.LOCK_EX):
            pass
        with _flock(machine, fcntl.LOCK_SH):
            yield


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """The lock spans the test's set-up (module fixtures that start processes), call and teardown."""
    with _machine(item.config, alone=item.get_closest_marker('alone') is not None):
        return (yield)
