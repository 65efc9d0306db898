"""Helpers for the zoo tests: a tiny real training run with its readout, through the CLI."""
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

FMNIST = 'loco_resnet18_small.simclr_fmnist'
TINY_TRAIN = ['--subset', '64', '--batch-size', '16', '--max-steps', '3', '--trackers', 'none']
TINY_READOUT = ['--epochs', '2', '--train-subset', '256', '--test-subset', '128', '--knn-k', '20']


def cli(*args, env=None, timeout=300):
    env = {**os.environ, 'OMP_NUM_THREADS': '2', **(env or {})}
    return subprocess.run([sys.executable, '-m', 'loco_timm', *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=timeout)


def train_and_read_out(run_dir: Path, config: str = FMNIST) -> Path:
    """Train a few steps of ``config`` on a Fashion-MNIST subset and read it out; returns the run folder."""
    for args in (('train', '--config', config, '--out-dir', run_dir, *TINY_TRAIN),
                 ('readout', run_dir, '--config', config, *TINY_READOUT)):
        result = cli(*args)
        assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def reference_logits(run_dir: Path, x: torch.Tensor) -> torch.Tensor:
    """Logits of the trained encoder (through the learner) and the readout head, computed without the export."""
    from loco_timm.evaluation.readout import _learner_from_checkpoint
    from loco_timm.training.checkpoint import resolve_checkpoint
    learner = _learner_from_checkpoint(resolve_checkpoint(run_dir))[0].eval()
    head = load_file(str(run_dir / 'readout_head.safetensors'))
    with torch.no_grad():
        features = learner.encoder.forward_head(learner(x)[-1], pre_logits=True)
    return features @ head['fc.weight'].T + head['fc.bias']
