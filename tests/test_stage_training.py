"""Stage parallelism in `loco-timm train` (recipe keys pipeline, placement, pipelined): real gloo processes through
accelerate launch, whole-model checkpoints, exact resume including the pending delayed gradient, signals."""
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from shared_runs import ALONE, PROCESSES
from zoo_common import cli_here

from loco_timm import LocalLearner
from loco_timm.data.datasets import find_fashion_mnist
from loco_timm.training.checkpoint import list_checkpoints, read_progress, verify_checkpoint
from loco_timm.training.placement import step_costs

HERE = Path(__file__).parent
FMNIST = 'loco_resnet18_small.simclr_fmnist'
# the main job's model (BatchNorm in stages and decoders), short
SHORT = ['--config', FMNIST, '--subset', '64', '--batch-size', '16', '--max-steps', '8', '--log-every', '1',
         '--trackers', 'none']


def slow(test):
    """Processes that train on Fashion-MNIST."""
    needs_data = pytest.mark.skipif(find_fashion_mnist() is None, reason='Fashion-MNIST not installed')
    return pytest.mark.slow(needs_data(test))


def _port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _launch(run, *extra, processes=2):
    """`accelerate launch -m loco_timm train` on gloo CPU processes, one thread each, in a new session."""
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'ACCELERATE_USE_CPU': '1', 'PYTHONUNBUFFERED': '1'}
    launch = (['--cpu', '--num_processes', '1'] if processes == 1 else
              ['--multi_gpu', '--num_processes', str(processes), '--main_process_ip', '127.0.0.1',
               '--main_process_port', str(_port())])
    return subprocess.Popen([sys.executable, '-m', 'accelerate.commands.launch', *launch, '--num_machines', '1',
                             '--mixed_precision', 'no', '--dynamo_backend', 'no', '-m', 'loco_timm', 'train',
                             '--out-dir', str(run), *SHORT, *map(str, extra)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _finish(proc, timeout=600):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return out


def _weights(run, index=-1):
    return load_file(str(list_checkpoints(run)[index] / 'learner.safetensors'))


def _same(a, b):
    assert a.keys() == b.keys()
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope='module')
def single(tmp_path_factory):
    """One process, one thread: the reference of the synchronous mode (trained in the test process)."""
    run = tmp_path_factory.mktemp('single') / 'run'
    cli_here('train', '--out-dir', run, *SHORT)
    return _weights(run)


@slow
@PROCESSES
def test_synchronous_stage_groups_train_to_the_weights_of_one_process(single, tmp_path):
    run = tmp_path / 'run'  # the placement measured at the start (an explicit one: the pipelined tests below)
    _finish(_launch(run, '--pipeline', '2'))
    final = _weights(run)
    assert final.keys() == single.keys()  # a whole-model checkpoint, with the untrained classifier
    for name in single:
        torch.testing.assert_close(final[name], single[name], rtol=1e-5, atol=1e-6, msg=name)
    checkpoint = list_checkpoints(run)[-1]
    assert verify_checkpoint(checkpoint) is None
    saved = read_progress(checkpoint)['placement']
    assert [k for g in saved for k in g] == [0, 1, 2, 3] and len(saved) == 2
    assert sorted(p.name for p in checkpoint.glob('optimizer-*')) == ['optimizer-0.safetensors',
                                                                      'optimizer-1.safetensors']
    assert not list(checkpoint.glob('part-*'))  # merged into learner.safetensors


@slow
@PROCESSES
@ALONE  # 4 processes
def test_two_stage_groups_times_two_replicas_train_to_the_weights_of_two_data_parallel_processes(tmp_path):
    """4 processes: 2 stage groups x 2 replicas, each replica half of every batch (its BatchNorm statistics on that
    half), negatives gathered across replicas, gradients averaged: the run of 2 data-parallel processes."""
    _finish(_launch(tmp_path / 'data_parallel', processes=2))
    _finish(_launch(tmp_path / 'grid', '--pipeline', '2', processes=4))
    expected, final = _weights(tmp_path / 'data_parallel'), _weights(tmp_path / 'grid')
    assert final.keys() == expected.keys()
    for name in expected:  # BatchNorm statistics too: the checkpoint holds replica 0's, as process 0's there
        torch.testing.assert_close(final[name], expected[name], rtol=1e-4, atol=1e-5, msg=name)


@slow
@PROCESSES
def test_pipelined_run_resumes_exactly_with_its_delayed_gradient_and_stops_all_processes_at_one_step(tmp_path):
    reference = tmp_path / 'reference'
    _finish(_launch(reference, '--pipeline', '2', '--pipelined', '--checkpoint-every', '5', '--keep-checkpoints', '10'))
    expected = _weights(reference)
    checkpoint = list_checkpoints(reference)[0]
    assert sorted(p.name for p in checkpoint.glob('delayed-*')) == ['delayed-0.safetensors', 'delayed-1.safetensors']
    assert load_file(str(checkpoint / 'delayed-0.safetensors'))  # process 0's stage 1 waits for unit 1's gradient

    middle = tmp_path / 'middle'  # resume from step 5: the delayed gradient of batch 5 comes from the checkpoint
    shutil.copytree(reference, middle)
    for c in list_checkpoints(middle)[1:]:
        shutil.rmtree(c)
    out = _finish(_launch(middle, '--pipeline', '2', '--pipelined', '--checkpoint-every', '5', '--keep-checkpoints',
                          '10', '--resume'))
    assert 'step-00000005 at step 5' in out
    assert _same(_weights(middle), expected)

    run = tmp_path / 'run'
    proc = _launch(run, '--pipeline', '2', '--pipelined', '--max-steps', '400', '--checkpoint-every', '1000')
    deadline = time.time() + 300
    while not (run / 'losses.jsonl').is_file() or len((run / 'losses.jsonl').read_text().splitlines()) < 3:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGTERM)  # every process at once, each at its own step of the pipeline
    _, err = proc.communicate(timeout=300)
    # both ranks write their line to the same stderr, possibly on one line
    stops = re.findall(r'loco-timm train: stopped by SIGTERM after step (\d+) of', err)
    assert len(stops) == 2 and len(set(stops)) == 1, err[-3000:]
    stopped = list_checkpoints(run)[-1]
    assert verify_checkpoint(stopped) is None and 3 <= int(stopped.name[5:]) < 400


@slow
@PROCESSES
def test_pipelined_differs_from_synchronous_and_a_placement_change_is_refused_on_resume(single, tmp_path):
    run = tmp_path / 'run'
    _finish(_launch(run, '--pipeline', '2', '--pipelined', '--placement', '[[0, 1], [2, 3]]'))
    final = _weights(run)
    assert max((final[k] - single[k]).abs().max().item() for k in single if single[k].is_floating_point()) > 1e-3
    proc = _launch(run, '--pipeline', '2', '--pipelined', '--placement', '[[0], [1, 2, 3]]', '--resume')
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert 'cannot resume: the checkpoint was written with stage placement [[0, 1], [2, 3]]' in err


@pytest.mark.parametrize('args, message', [
    (['--pipelined'], 'pipelined: true needs stage parallelism: set pipeline: 2'),
    (['--pipeline', '2', '--placement', '[[0, 1], [2], [3]]'], 'placement has 3 stage groups but pipeline=2'),
    (['--pipeline', '2', '--mode', 'e2e', '--pipelined'], 'E2E runs stage-parallel synchronously only'),
    (['--pipeline', '2', '--sharing', 'l2'], 'sharing: l2 keeps a copy of each shared stage'),
])
def test_bad_stage_parallel_recipes_are_one_line_errors(tmp_path, capsys, args, message):
    from loco_timm import cli
    assert cli.main(['train', '--out-dir', str(tmp_path), *SHORT, *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


@slow
def test_stage_groups_need_a_multiple_of_their_count_of_processes(tmp_path):
    from loco_timm.config import ConfigError, TrainConfig
    from loco_timm.training.train import train
    cfg = TrainConfig(backbone='test_resnet', image_size=32, subset=64, batch_size=16, pipeline=2, trackers='none',
                      out_dir=str(tmp_path))
    with pytest.raises(ConfigError, match=r'2 stage groups need a multiple of 2 processes \(P x replicas\), not 1'):
        train(cfg)


def test_step_costs_measure_every_stage_and_leave_the_learner_as_it_was():
    import timm
    torch.manual_seed(0)
    learner = LocalLearner(timm.create_model('test_resnet'), mode='loco', input_size=(3, 32, 32))
    before = {k: v.clone() for k, v in learner.state_dict().items()}
    h = torch.randn(8, 3, 32, 32)
    rng = torch.get_rng_state()
    costs = step_costs(learner, h, repeats=2)
    assert len(costs) == len(learner.stages) and all(c > 0 for c in costs)
    assert all(torch.equal(v, before[k]) for k, v in learner.state_dict().items())  # BatchNorm statistics too
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in learner.parameters())
