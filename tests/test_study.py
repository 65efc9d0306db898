"""`loco-timm study`: arms x seeds trained and read out, resumable, with paired differences and claims."""
import json

import pytest
from zoo_common import cli, cli_here

from loco_timm.data.datasets import find_fashion_mnist
from loco_timm.evaluation.study import CLAIMS, results_markdown, summarize

pytestmark = pytest.mark.skipif(find_fashion_mnist() is None, reason='Fashion-MNIST not installed')


def _run(arm, seed, linear):
    return dict(arm=arm, seed=seed, linear=linear, knn=linear)


def test_summary_pairs_seeds_and_checks_the_claims():
    runs = [_run('loco_conv', 0, [50, 80.0]), _run('loco_conv', 1, [50, 82.0]),
            _run('e2e_mlp', 0, [50, 80.2]), _run('e2e_mlp', 1, [50, 81.6]),
            _run('gim_conv', 0, [50, 78.0]), _run('gim_conv', 1, [50, 79.0]),
            _run('gim_mlp', 0, [50, 79.0]), _run('e2e_conv', 0, [50, 83.0]),
            _run('e2e_mlp', 2, [50, 95.0])]  # a seed LoCo does not have yet: not in the pairs, nor in the claims
    summary = summarize(runs)
    assert summary['pairs']['LoCo - E2E']['diff'] == pytest.approx([-0.2, 0.4])
    assert summary['pairs']['LoCo - GIM']['diff'] == pytest.approx([2.0, 3.0])
    assert summary['pairs']['GIM: conv - mlp decoder'] == dict(seeds=[0], diff=pytest.approx([-1.0]))
    assert summary['pairs']['E2E: conv - mlp decoder'] == dict(seeds=[0], diff=pytest.approx([2.8]))
    assert summary['arms']['loco_conv']['per_stage'] == [50, 81.0]
    claims = summary['claims']
    assert summary['arms']['e2e_mlp']['seeds'] == [0, 1, 2]
    assert claims[CLAIMS[0]] and claims[CLAIMS[1]]  # paired means: |0.1| <= 0.5; 2.5 > 0
    assert not claims[CLAIMS[2]] and not claims[CLAIMS[3]]  # seed 0 only: 78 - 79 < 0; 83 - 80.2 > 0.5


def test_results_give_the_time_the_runs_took():
    runs = [dict(_run('loco_conv', 0, [80.0]), train_seconds=600.4, readout_seconds=240.0, machine='CPU B'),
            dict(_run('e2e_mlp', 0, [81.0]), train_seconds=500.0, readout_seconds=100.6, machine='CPU A'),
            dict(_run('e2e_mlp', 1, [81.0]), train_seconds=500.0, readout_seconds=100.6),  # recorded before machines
            _run('gim_conv', 0, [79.0])]  # a run without timings (an older results file) is left out of them
    timing = summarize(runs)['timing']
    assert timing == dict(train=[500.0, 600.4], readout=[100.6, 240.0], hours=pytest.approx(2041.6 / 3600),
                      runs=3, machines=['CPU A', 'CPU B'])
    assert results_markdown(summarize(runs), 3).endswith(
        'Time per run on the machines that ran them (CPU A, CPU B where recorded): training 500-600 s, '
        'readout 101-240 s; 0.6 hours for 3 runs.')
    assert summarize(runs[3:])['timing'] is None and 'Time per run' not in results_markdown(summarize(runs[3:]), 3)


@pytest.mark.slow
def test_study_trains_every_arm_and_seed_once_and_resumes(tmp_path, capsys):
    args = ['study', '--out', tmp_path, '--arms', 'e2e_mlp', 'gim_conv', 'loco_conv', '--seeds', '0', '1',
            '--set', 'subset', '64', '--set', 'batch_size', '16', '--set', 'max_steps', '3', '--set', 'log_every', '1',
            '--set', 'trackers', 'none', '--readout-set', 'epochs', '2', '--readout-set', 'train_subset', '256',
            '--readout-set', 'test_subset', '128', '--readout-set', 'knn_k', '20']
    cli_here(*args)  # `loco-timm study ARGS`, in the test process
    first = capsys.readouterr().out
    results = json.loads((tmp_path / 'results.json').read_text())
    assert sorted((r['arm'], r['seed']) for r in results['runs']) == [
        (a, s) for a in ('e2e_mlp', 'gim_conv', 'loco_conv') for s in (0, 1)]
    units = {'e2e_mlp': 1, 'gim_conv': 4, 'loco_conv': 3}
    for run in results['runs']:
        assert run['steps'] == 3 and len(run['linear']) == 4 and len(run['losses']) == units[run['arm']]
        assert run['machine']  # the CPU's model name here, recorded by the training summary
    assert results['summary']['pairs']['LoCo - E2E']['seeds'] == [0, 1]
    # reference rows read out once: the pixel row for all six runs, the random-init row once per seed
    assert len(list((tmp_path / 'references').iterdir())) == 3 and first.count('(cached:') == 6 * 2 - 3
    for run in results['runs']:
        assert run['references'] == next(r['references'] for r in results['runs'] if r['seed'] == run['seed'])
    assert (tmp_path / 'readout.png').stat().st_size > 1000 and (tmp_path / 'losses.png').stat().st_size > 1000
    text = (tmp_path / 'results.md').read_text()
    assert 'LoCo - GIM' in text and 'not measured yet' in text  # gim_mlp / e2e_conv arms were not run
    cli_here(*args)
    assert capsys.readouterr().out.count('done, skipped') == 6
    assert json.loads((tmp_path / 'results.json').read_text())['summary'] == results['summary']


def test_ablation_arms_are_paired_with_the_arm_they_change_next_to_the_papers_difference():
    runs = [_run('loco_conv', 0, [50, 80.0]), _run('loco_conv', 1, [50, 82.0]),
            _run('loco_upper', 0, [50, 79.0]), _run('loco_upper', 1, [50, 82.5]),
            _run('loco_mlp4', 0, [50, 81.0])]
    summary = summarize(runs)
    upper = summary['ablations']['loco_upper']
    assert upper['reference'] == 'loco_conv' and upper['diff'] == pytest.approx([-1.0, 0.5])
    assert upper['paper_diff'] == pytest.approx(65.3 - 66.2)
    assert summary['ablations']['loco_mlp4']['seeds'] == [0]
    text = results_markdown(summary, 2)
    assert '| upper-layer gradient only | loco_upper - loco_conv | -1.00, +0.50 | -0.25 +- 1.06 | -0.9 | yes |' in text
    assert '| LoCo + 2 more MLP layers | loco_mlp4 - loco_conv | +1.00 | 1.00 (1 seed) | +1.3 | yes |' in text
    assert text.startswith('2 of 18 runs of the main arms (6 arms x 3 seeds): **partial**, means over the seeds run '
                           'so far. Ablation arms: 3 runs of 2 of the 9 arms so far (2 seeds each planned: '
                           '**partial**).')


def test_arm_groups_expand_to_the_arms_and_their_references():
    from loco_timm.evaluation.study import ABLATIONS, ARMS, expand_arms
    assert expand_arms(None) == list(ARMS)
    ablations = expand_arms(['ablations'])
    assert set(ablations) == set(ABLATIONS) | {'loco_conv', 'gim_conv', 'gim_mlp', 'e2e_mlp'}
    assert ablations.index('loco_conv') < ablations.index('loco_upper')  # references first
    with pytest.raises(ValueError, match='unknown arm loco_sideways: valid arms are .* and the groups main, ablations'):
        expand_arms(['loco_sideways'])


@pytest.mark.slow
def test_study_runs_the_ablation_arms_through_train_and_readout(tmp_path):
    args = ['study', '--out', tmp_path, '--arms', 'loco_conv', 'loco_upper', 'loco_blocks1', 'loco_l2_1e-3',
            'loco_mlp4', '--seeds', '0', '--set', 'subset', '64', '--set', 'batch_size', '16', '--set', 'max_steps',
            '2', '--set', 'trackers', 'none', '--readout-set', 'epochs', '1', '--readout-set', 'train_subset', '128',
            '--readout-set', 'test_subset', '64', '--readout-set', 'knn_k', '10']
    cli_here(*args)  # `loco-timm study ARGS`, in the test process
    results = json.loads((tmp_path / 'results.json').read_text())
    runs = {r['arm']: r for r in results['runs']}
    assert len(runs['loco_blocks1']['linear']) == 7 and len(runs['loco_upper']['linear']) == 4  # blocks: 2K-1 stages
    assert set(results['summary']['ablations']) == {'loco_upper', 'loco_blocks1', 'loco_l2_1e-3', 'loco_mlp4'}
    assert 'L2 soft sharing 1e-3 | loco_l2_1e-3 - loco_conv' in (tmp_path / 'results.md').read_text()
    bad = cli('study', '--out', tmp_path, '--arms', 'loco_sideways', timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().count('\n') == 0 and 'unknown arm loco_sideways' in bad.stderr


def test_runs_recorded_in_a_committed_results_file_count_as_finished(tmp_path):
    """A study spans machines: the run folders are not committed, results.json is."""
    import copy

    from loco_timm.config import load_recipe
    from loco_timm.evaluation.study import run_study
    recipe = load_recipe('loco_resnet18_small.simclr_fmnist')
    recorded = [dict(_run('loco_conv', 0, [50, 80.0]), steps=3), dict(_run('e2e_mlp', 0, [50, 81.0]), steps=3)]
    results = dict(config='loco_resnet18_small.simclr_fmnist', recipe=recipe, train_overrides={'max_steps': 3},
                   readout_overrides={}, seeds=[0], runs=recorded)
    (tmp_path / 'results.json').write_text(json.dumps(results))
    seen = []
    out = run_study(tmp_path, 'loco_resnet18_small.simclr_fmnist', [0], ['loco_conv', 'e2e_mlp'],
                    train_overrides={'max_steps': 3}, readout_overrides={}, log=seen.append)
    assert seen == [f'loco_conv seed 0: recorded in {tmp_path / "results.json"}, skipped',
                    f'e2e_mlp seed 0: recorded in {tmp_path / "results.json"}, skipped']
    assert [(r['arm'], r['seed']) for r in out['runs']] == [('e2e_mlp', 0), ('loco_conv', 0)]
    assert out['summary']['pairs']['LoCo - E2E']['diff'] == pytest.approx([-1.0])
    other = copy.deepcopy(results)
    other['recipe']['train']['epochs'] = 10
    (tmp_path / 'results.json').write_text(json.dumps(other))
    with pytest.raises(ValueError, match='records runs of another recipe or other --set'):
        run_study(tmp_path, 'loco_resnet18_small.simclr_fmnist', [0], ['loco_conv'], train_overrides={'max_steps': 3},
                  readout_overrides={})
