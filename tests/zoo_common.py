"""Helpers for the zoo tests: a tiny real training run with its readout (the shared one: conftest.py's fmnist_run,
trained through the CLI), the CLI in a process of its own, and the same commands in the test process (where the
process is not the point: what a command answers is the same in either)."""
import io
import os
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import torch
from safetensors.torch import load_file
from shared_runs import in_process

FMNIST = 'loco_resnet18_small.simclr_fmnist'
# 6 steps of 4 batches of 16 per epoch, checkpoints at steps 3 and 6 (both kept)
TINY_TRAIN = ['--subset', '64', '--batch-size', '16', '--max-steps', '6', '--checkpoint-every', '3',
              '--keep-checkpoints', '2', '--trackers', 'none']
TINY_READOUT = ['--epochs', '2', '--train-subset', '256', '--test-subset', '128', '--knn-k', '20']


def cli(*args, env=None, timeout=300):
    """`loco-timm ARGS` in a process of its own, one thread: a pytest worker per core, so a second thread would only
    oversubscribe the cores (an OpenMP team waits for its descheduled member); the tests that compare runs compare
    runs of this thread count."""
    env = {**os.environ, 'OMP_NUM_THREADS': '1', **(env or {})}
    return subprocess.run([sys.executable, '-m', 'loco_timm', *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=timeout)


def cli_here(*args, threads=1) -> None:
    """`loco-timm ARGS` in the test process (:func:`shared_runs.in_process`), where the test is not about the
    process; it must succeed."""
    from loco_timm import cli as loco_cli
    with in_process(threads):
        assert loco_cli.main([str(a) for a in args]) == 0, args


def cli_outcome(*args, threads=1) -> subprocess.CompletedProcess:
    """`loco-timm ARGS` in the test process, with the exit status and what it printed (stdout, stderr) that
    :func:`cli` gives: for the tests of what a command answers (a one-line error and its exit status, a checkpoint
    skipped), where a process of its own would add only its start-up."""
    from loco_timm import cli as loco_cli
    argv = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    with in_process(threads), redirect_stdout(out), redirect_stderr(err):
        try:
            code = loco_cli.main(argv)
        except SystemExit as e:  # argparse's usage errors
            code = e.code if isinstance(e.code, int) else 1
    return subprocess.CompletedProcess(['loco-timm', *argv], code, out.getvalue(), err.getvalue())


def train_and_read_out(run_dir: Path, config: str = FMNIST) -> Path:
    """Train a few steps of ``config`` on a Fashion-MNIST subset and read it out, in the test process; returns the
    run folder."""
    cli_here('train', '--config', config, '--out-dir', run_dir, *TINY_TRAIN)
    cli_here('readout', run_dir, '--config', config, *TINY_READOUT)
    return run_dir


def reference_logits(run_dir: Path, x: torch.Tensor) -> torch.Tensor:
    """Logits of the trained encoder (through the learner) and the readout head, computed without the export."""
    from loco_timm.evaluation.readout import _learner_from_checkpoint
    from loco_timm.training.checkpoint import resolve_checkpoint
    learner = _learner_from_checkpoint(resolve_checkpoint(run_dir))[0].eval()
    head = load_file(str(run_dir / 'readout_head.safetensors'))
    with torch.no_grad():
        features = learner.encoder.forward_head(learner(x)[-1], pre_logits=True)
    (weight,), (bias,) = ([v for k, v in head.items() if k.endswith(f'.{p}')] for p in ('weight', 'bias'))
    return features @ weight.T + bias  # the classifier of the architecture: `fc` of a ResNet, `head` of a ViT
