"""Optimiser groups (LARS exclusions) and the warm-up + cosine schedule."""
import math

import pytest
import timm
import torch

from loco_timm import LocalLearner
from loco_timm.config import TrainConfig
from loco_timm.training.optim import build_optimizer, build_scheduler


def test_lars_excludes_biases_and_norms_from_decay_and_adaptation():
    learner = LocalLearner(timm.create_model('test_resnet'), input_size=(3, 32, 32))
    optimizer = build_optimizer(learner, TrainConfig(optimizer='lars', weight_decay=1e-6, batch_size=512))
    assert type(optimizer).__name__ == 'Lars'
    decayed = [g for g in optimizer.param_groups if g['weight_decay'] > 0]
    plain = [g for g in optimizer.param_groups if g['weight_decay'] == 0]
    assert all(p.ndim > 1 for g in decayed for p in g['params'])
    assert all(p.ndim <= 1 for g in plain for p in g['params'])
    assert not any(g.get('always_adapt') for g in optimizer.param_groups)  # no decay -> no LARS trust ratio
    assert all(g['lr'] == pytest.approx(0.3 * 512 / 256) for g in optimizer.param_groups)


def test_schedule_warms_up_linearly_then_follows_a_cosine():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    scheduler = build_scheduler(optimizer, total_steps=110, warmup_steps=10)
    lrs = []
    for step in range(110):
        scheduler.step_update(step)
        lrs.append(optimizer.param_groups[0]['lr'])
    assert lrs[0] == 0 and lrs[5] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(2.0)
    assert lrs[60] == pytest.approx(1.0, rel=1e-6)  # half-way through the cosine
    assert lrs[-1] == pytest.approx(2.0 * (1 + math.cos(math.pi * 99 / 100)) / 2)
