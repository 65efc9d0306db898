"""Stage parallelism: P gloo processes, each holding a contiguous group of stages, give the weights and BatchNorm
statistics of one process after several optimizer steps (synchronous mode is exact: LoCo on 2 and 3 processes, GIM
and E2E on 3), and pipelined LoCo those of a hand-written reference of its one-step-late gradients."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from shared_runs import ALONE, PROCESSES
from stage_parallel_worker import pipelined_reference, reference

from loco_timm.training.stage_parallel import balance, check_placement

HERE = os.path.dirname(__file__)
JOBS = {2: [('loco', [[0, 1], [2, 3]], False), ('loco', [[0, 1], [2, 3]], True),
            ('loco+recompute', [[0, 1], [2, 3]], True)],
        3: [('loco', [[0], [1, 2], [3]], False), ('gim', [[0, 1], [2], [3]], False), ('e2e', [[0], [1], [2, 3]], False),
            ('gim', [[0, 1], [2], [3]], True)],
        4: [('loco', [[0, 1], [2, 3]], False)]}  # 2 stage groups x 2 replicas


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    """Both process groups run at once: {world: [(per-rank tensors and info) per job]}."""
    tmp, env = tmp_path_factory.mktemp('stage_parallel'), {**os.environ, 'OMP_NUM_THREADS': '1'}
    worker, procs = os.path.join(HERE, 'stage_parallel_worker.py'), []
    for world, jobs in JOBS.items():
        args = [str(world), str(_free_port()), str(tmp / f'w{world}'), json.dumps(jobs)]
        procs += [subprocess.Popen([sys.executable, worker, str(r), *args], env=env, stderr=subprocess.PIPE,
                                   text=True) for r in range(world)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    def info(path):
        return json.loads(path.read_text()) if path.is_file() else None
    return {world: [[(load_file(str(tmp / f'w{world}-{i}-rank{r}.safetensors')),
                      info(tmp / f'w{world}-{i}-rank{r}.json'),
                      load_file(str(tmp / f'w{world}-{i}-dp{r}.safetensors'))
                      if (tmp / f'w{world}-{i}-dp{r}.safetensors').is_file() else None) for r in range(world)]
                    for i in range(len(jobs))] for world, jobs in JOBS.items()}


@pytest.mark.slow
@PROCESSES
@ALONE  # the first test of the module (in the processes group, in file order): it sets up `runs`, nine processes
def test_two_stage_groups_times_two_replicas_equal_two_data_parallel_processes(runs):
    """Each replica of the 2 x 2 grid ends with the weights and BatchNorm statistics of the data-parallel process
    that saw the same share of each batch (negatives gathered across replicas, gradients averaged)."""
    ranks = runs[4][0]
    for replica in range(2):
        expected = ranks[replica][2]
        held = {**ranks[2 * replica][0], **ranks[2 * replica + 1][0]}
        assert set(expected) - set(held) == {'encoder.fc.weight', 'encoder.fc.bias'}
        for name, value in held.items():
            torch.testing.assert_close(value, expected[name], rtol=1e-10, atol=1e-12, msg=name)
    first, second = ranks[0][2], ranks[1][2]  # the data-parallel replicas differ (BatchNorm statistics)
    assert any(not torch.equal(first[k], second[k]) for k in first)


@pytest.mark.slow
@PROCESSES  # not alone: it reads what `runs` recorded (an exclusive turn each would wait out the other worker's test)
@pytest.mark.parametrize('world,job', [(w, i) for w, jobs in JOBS.items() if w <= 3 for i in range(len(jobs))])
def test_stage_parallel_steps_give_the_weights_of_the_reference(runs, world, job):
    """Synchronous: one process's weights. Pipelined LoCo (with recomputation too): the hand-written
    delayed-gradient reference. Pipelined GIM: one process's (no gradient crosses a cut, nothing is delayed;
    finish's extra step moves nothing)."""
    mode, _, pipelined = JOBS[world][job]
    expected = pipelined_reference() if pipelined and mode.startswith('loco') else reference(mode)
    ranks, seen = runs[world][job], set()
    for held, info, _ in ranks:
        for name, value in held.items():
            assert name not in seen, f'{name} on two processes'
            seen.add(name)
            torch.testing.assert_close(value, expected[name], rtol=1e-10, atol=1e-12, msg=name)
        assert 0 < info['held'] < info['total']  # each process holds only its part
    classifier = {'encoder.fc.weight', 'encoder.fc.bias'}  # in no stage: trained by no unit, held by no process
    assert set(expected) - seen == classifier  # every other parameter and buffer lives on exactly one process
    assert sum(info['held'] for _, info, _ in ranks) == ranks[0][1]['total'] - sum(expected[k].numel()
                                                                                   for k in classifier)
    units = sorted(j for _, info, _ in ranks for j in info['units'])
    assert units == list(range(len(units)))  # each unit's decoder on exactly one process


def test_balance_splits_stage_costs_into_contiguous_groups_with_the_smallest_maximum():
    assert balance([1, 1, 1, 1], 2) == [[0, 1], [2, 3]]
    assert balance([4, 1, 1, 1, 1], 2) == [[0], [1, 2, 3, 4]]
    assert balance([1, 2, 3, 4], 3) == [[0, 1], [2], [3]]
    assert balance([5, 5, 5], 3) == [[0], [1], [2]]
    with pytest.raises(ValueError, match='cannot place 2 stages on 3 processes'):
        balance([1, 1], 3)
    with pytest.raises(ValueError, match=r'must split stages 0..3 into contiguous, non-empty groups'):
        check_placement([[0, 2], [1, 3]], 4)
    assert check_placement([(0,), (1, 2, 3)], 4) == [[0], [1, 2, 3]]


def test_stashed_forward_keeps_the_weights_and_statistics_of_its_forward():
    """Weight stashing: after an optimizer-like in-place update and another forward (BatchNorm statistics updated in
    place), the kept graph still gives the gradient at the weights of its forward; the statistics are updated once."""
    import copy

    from torch import nn

    from loco_timm.core.gradients import stashed_forward
    torch.manual_seed(0)
    stage = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).double()
    x, grad = torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.randn(4, 4, 6, 6, dtype=torch.float64)
    reference = copy.deepcopy(stage)
    expected_out = reference(x)
    expected = torch.autograd.grad(expected_out, list(reference.parameters()), grad)
    out = stashed_forward(stage, x)
    torch.testing.assert_close(out, expected_out, rtol=0, atol=0)
    for b, e in zip(stage.buffers(), reference.buffers()):
        assert torch.equal(b, e)
    with torch.no_grad():
        for p in stage.parameters():
            p.add_(1.0)
    stage(torch.randn_like(x))
    torch.autograd.backward(out, grad)
    for p, e in zip(stage.parameters(), expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-12, atol=1e-12)
    plain = stage(x)
    with torch.no_grad():
        stage[0].weight.add_(1.0)
    with pytest.raises(RuntimeError, match='modified by an inplace operation'):  # what stashing avoids
        plain.sum().backward()
