"""NT-Xent across 2 gloo processes: gathered negatives with gradient give the single-process gradients."""
import os
import socket
import subprocess
import sys

import pytest
import torch
from dist_common import build_learner, global_views, trainable_grads
from safetensors.torch import load_file
from shared_runs import PROCESSES

HERE = os.path.dirname(__file__)


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _two_rank_grads(tmp_path, gather):
    port, out = _free_port(), str(tmp_path / f'{gather}.safetensors')
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, 'dist_worker.py'), str(r), '2', str(port), out,
                               gather], env=env, stderr=subprocess.PIPE, text=True) for r in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    return load_file(out)


def _single_process_grads():
    learner = build_learner()
    learner.step(*global_views())
    return trainable_grads(learner)


@pytest.mark.slow
@PROCESSES
def test_two_processes_with_half_batches_match_one_process(tmp_path):
    expected = _single_process_grads()
    actual = _two_rank_grads(tmp_path, 'autograd')
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.slow
@PROCESSES
def test_gather_without_autograd_breaks_the_equivalence(tmp_path):
    expected = _single_process_grads()
    actual = _two_rank_grads(tmp_path, 'detached')
    worst = max((actual[n] - expected[n]).abs().max().item() / (expected[n].abs().max().item() + 1e-30)
                for n in expected)
    assert worst > 1e-3  # the test above would catch this implementation
