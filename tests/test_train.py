"""Training through Accelerate: process/machine equivalence, bf16, kill and resume, non-finite losses, bad input.

Launches of several processes are what the multi-process tests are about; single-process references, set-up runs and
the commands whose process does not matter run in the test process (shared_runs.in_process)."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from shared_runs import PROCESSES, in_process
from zoo_common import cli_here

from loco_timm.config import TrainConfig, from_dict
from loco_timm.data.datasets import find_fashion_mnist
from loco_timm.training.checkpoint import latest_checkpoint, list_checkpoints
from loco_timm.training.train import train

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(find_fashion_mnist() is None, reason='Fashion-MNIST not installed')]
HERE = Path(__file__).parent
ACCELERATE = [sys.executable, '-m', 'accelerate.commands.launch']
# test_convnext and LayerNorm decoders: no batch statistics, so any split of the batch gives the same gradients
TINY = dict(backbone='test_convnext', dataset='fashion_mnist', subset=64, image_size=32, batch_size=16, max_steps=6,
            mode='loco', top_unit=True, decoder_norm='layer', optimizer='sgd', base_lr=4.0, momentum=0.9,
            weight_decay=0.0, warmup_epochs=0, checkpoint_every=3, log_every=1, trackers='none', seed=0)


def _port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _env():
    return {**os.environ, 'ACCELERATE_USE_CPU': '1', 'OMP_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1'}


def _launch_args(processes, machines=1, machine_rank=0, port=None):
    if processes == 1:
        return ['--cpu', '--num_processes', '1', '--num_machines', '1', '--mixed_precision', 'no',
                '--dynamo_backend', 'no']
    return ['--multi_gpu', '--num_processes', str(processes), '--num_machines', str(machines),
            '--machine_rank', str(machine_rank), '--main_process_ip', '127.0.0.1', '--main_process_port',
            str(port or _port()), '--mixed_precision', 'no', '--dynamo_backend', 'no']


def _worker(recipe, processes=1, extra=(), **launch):
    return ACCELERATE + _launch_args(processes, **launch) + [str(HERE / 'train_worker.py'), json.dumps(recipe),
                                                            *extra]


def _run(cmd, timeout=300):
    result = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)
    return result


def _weights(run_dir):
    return load_file(str(latest_checkpoint(run_dir) / 'learner.safetensors'))


@pytest.fixture(scope='module')
def one_process(tmp_path_factory):
    """The one-process reference, trained in the test process: its checkpoints and the averaged gradients of step 1
    (what train_worker.py --dump-grads saves)."""
    from safetensors.torch import save_file
    out = tmp_path_factory.mktemp('one')

    def dump_grads(step, learner):
        if step == 0:
            save_file({n: p.grad.detach().clone() for n, p in learner.named_parameters() if p.grad is not None},
                      str(out / 'grads.safetensors'))
    with in_process():
        train(from_dict(TrainConfig, dict(TINY, out_dir=str(out / 'run'))), after_backward=dump_grads)
    return out


@PROCESSES
def test_two_processes_match_one_process(one_process, tmp_path):
    recipe = dict(TINY, out_dir=str(tmp_path / 'run'))
    result = _run(_worker(recipe, 2, ['--dump-grads', str(tmp_path / 'grads.safetensors')]))
    assert result.returncode == 0, result.stderr[-3000:]
    expected, actual = load_file(str(one_process / 'grads.safetensors')), load_file(str(tmp_path / 'grads.safetensors'))
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)
    first = load_file(str(list_checkpoints(one_process / 'run')[0] / 'learner.safetensors'))
    final_one, final_two = _weights(one_process / 'run'), _weights(tmp_path / 'run')
    moved = max((final_one[k] - first[k]).abs().max().item() for k in first if first[k].is_floating_point())
    assert moved > 1e-2  # the parameters moved far beyond the tolerance below
    for name in final_one:
        torch.testing.assert_close(final_two[name], final_one[name], rtol=1e-4, atol=1e-5, msg=name)


@PROCESSES
def test_two_machines_on_loopback_match_one_process(one_process, tmp_path):
    recipe = dict(TINY, out_dir=str(tmp_path / 'run'))
    port = _port()
    procs = [subprocess.Popen(_worker(recipe, 2, machines=2, machine_rank=r, port=port), env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    final_one, final_two = _weights(one_process / 'run'), _weights(tmp_path / 'run')
    for name in final_one:
        torch.testing.assert_close(final_two[name], final_one[name], rtol=1e-4, atol=1e-5, msg=name)


def test_bf16_mixed_precision_applies_inside_the_learner_step(tmp_path):
    # test_resnet: its stages end in conv/BN/ReLU, so under autocast their outputs are bf16 (ConvNeXt's residual
    # adds of float32 inputs would promote them back to float32)
    recipe = dict(TINY, backbone='test_resnet', out_dir=str(tmp_path / 'run'), max_steps=2, mixed_precision='bf16',
                  trackers='tensorboard')
    dtypes = []

    def record_dtype(step, learner):  # what train_worker.py --dump-dtype records: stage 1's output in step 2
        if step == 0:
            learner.stages[1].register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
    with in_process():
        train(from_dict(TrainConfig, recipe), after_backward=record_dtype)
    assert dtypes and set(dtypes) == {torch.bfloat16}
    assert list((tmp_path / 'run' / 'loco').glob('events.out.tfevents.*'))  # per-unit losses, lr, img/s


@PROCESSES
def test_non_finite_loss_on_one_process_stops_every_process_and_keeps_the_checkpoint(tmp_path):
    recipe = dict(TINY, out_dir=str(tmp_path / 'run'), checkpoint_every=1)
    # rank 1's 5th loss call is unit 1 of step 2 (4 units per step)
    result = _run(_worker(recipe, 2, ['--nan-rank', '1', '--nan-step', '6']))
    assert result.returncode != 0
    assert result.stderr.count('NonFiniteLossError: non-finite loss (nan) in unit 1 (1, 2) at step 2') == 2
    assert [p.name for p in list_checkpoints(tmp_path / 'run')] == ['step-00000001']


@PROCESSES
def test_batch_not_divisible_by_processes_is_a_one_line_error(tmp_path):
    cmd = ACCELERATE + _launch_args(2) + ['-m', 'loco_timm', 'train', '--backbone', 'test_convnext', '--image-size',
                                          '32', '--subset', '64', '--batch-size', '15', '--out-dir', str(tmp_path)]
    result = _run(cmd)
    assert result.returncode != 0
    assert 'error: batch_size=15 is not divisible by the 2 processes: use a multiple of 2' in result.stderr
    assert 'loco_timm/' not in result.stderr  # no traceback through our code (the launcher prints its own)


def _cli(*args):
    return [sys.executable, '-m', 'loco_timm', *args]


def _tiny_cli_args(out_dir, **changes):
    recipe = {**TINY, 'max_steps': 40, 'checkpoint_every': 4, 'out_dir': str(out_dir), **changes}
    args = []
    for key, value in recipe.items():
        args += [f'--{key.replace("_", "-")}', json.dumps(value) if not isinstance(value, str) else value]
    return args


def test_killed_run_resumes_to_the_same_weights_then_reads_out(tmp_path):
    cli_here('train', *_tiny_cli_args(tmp_path / 'full'))  # the uninterrupted reference

    run = tmp_path / 'killed'
    proc = subprocess.Popen(_cli('train', *_tiny_cli_args(run)), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while latest_checkpoint(run) is None and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = int(latest_checkpoint(run).name.split('-')[1])
    assert 0 < killed_at < 40, 'the run should have been killed after its first checkpoint and before the end'
    with open(run / 'losses.jsonl', 'a') as log:  # as if a row after the checkpoint had been logged before the kill
        log.write(json.dumps({'step': killed_at + 1, 'loss/unit0': 9.9}) + '\n')

    resumed = _run(_cli('train', '--resume', *_tiny_cli_args(run)))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    restart = int(resumed.stdout.split('at step ')[1].split()[0])
    assert restart >= killed_at > 0
    full, again = _weights(tmp_path / 'full'), _weights(run)
    for name in full:
        torch.testing.assert_close(again[name], full[name], rtol=1e-5, atol=1e-6, msg=name)
    steps = [[json.loads(line)['step'] for line in (folder / 'losses.jsonl').read_text().splitlines()]
             for folder in (tmp_path / 'full', run)]
    assert steps[1] == steps[0]  # rows logged between the checkpoint and the kill are not kept twice

    cli_here('readout', run, '--epochs', '2', '--train-subset', '256', '--test-subset', '128', '--knn-k', '20')
    results = json.loads((run / 'readout.json').read_text())
    assert set(results['rows']) == {'model', 'random_init', 'pixels'}
    assert len(results['rows']['model']['linear']) == 4 and len(results['rows']['pixels']['knn']) == 1
    assert (run / 'readout.png').stat().st_size > 1000 and (run / 'readout_head.safetensors').is_file()


def test_resume_with_an_incompatible_recipe_is_a_one_line_error(tmp_path):
    cli_here('train', *_tiny_cli_args(tmp_path, max_steps=1))
    again = _run(_cli('train', '--resume', *_tiny_cli_args(tmp_path, max_steps=1, batch_size=32)))
    assert again.returncode == 2
    assert again.stderr.strip().splitlines()[-1].startswith(
        "loco-timm train: error: cannot resume: the recipe differs from the checkpoint's in batch_size=32 "
        "(checkpoint: 16)")


@pytest.mark.parametrize('backbone', ['test_mambaout', 'test_coatnet'])
def test_train_command_trains_families_of_the_generic_splitter(tmp_path, backbone):
    """NHWC maps (MambaOut) and a hybrid conv/attention model (CoAtNet) through the whole command."""
    size = 64 if backbone == 'test_coatnet' else 32  # CoAtNet's attention grid follows its img_size argument
    extra = {'model_args': {'img_size': size}} if backbone == 'test_coatnet' else {}
    cli_here('train', *_tiny_cli_args(tmp_path, backbone=backbone, image_size=size, max_steps=2, checkpoint_every=2,
                                      **extra))
    assert latest_checkpoint(tmp_path) is not None


@pytest.mark.parametrize('backbone', ['loco_shufflenet_v2_50', 'loco_presnet50'])
def test_train_command_trains_the_papers_other_encoders(tmp_path, backbone):
    cli_here('train', *_tiny_cli_args(tmp_path, backbone=backbone, image_size=32, max_steps=2, checkpoint_every=2,
                                      batch_size=8))
    weights = load_file(str(latest_checkpoint(tmp_path) / 'learner.safetensors'))
    assert any(k.endswith('conv6.conv.weight' if 'shufflenet' in backbone else 'stages.5.2.conv.1.conv.weight')
               for k in weights)


def test_a_fixed_input_size_backbone_given_another_image_size_is_a_one_line_error(tmp_path):
    result = _run(_cli('train', *_tiny_cli_args(tmp_path, backbone='test_maxvit', image_size=32)))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and 'test_maxvit takes 160x160 px images only (a fixed input size), not image_size 32' in \
        lines[0], lines
