"""The budget trend: paired per-seed differences per budget, their standard errors, and the claims judged on
mean +- 2 standard errors (closed forms on small hand-made study results)."""
import json
import math

import pytest

from loco_timm.evaluation.trend import change, judge, trend, trend_markdown, write_trend


def _study(folder, epochs, linear, recipe_epochs=3, extra=None):
    """A results.json with the last-stage linear top-1 of each (arm, seed) in ``linear``."""
    folder.mkdir(parents=True)
    runs = [dict(arm=arm, seed=seed, linear=[50.0, value], knn=[40.0, value]) for (arm, seed), value in
            linear.items()]
    overrides = dict(epochs=epochs, **(extra or {})) if epochs != recipe_epochs else dict(extra or {})
    (folder / 'results.json').write_text(json.dumps(dict(recipe=dict(train=dict(epochs=recipe_epochs, seed=0)),
                                                         train_overrides=overrides, runs=runs)))
    return folder


def test_paired_differences_their_standard_errors_and_claims_per_budget(tmp_path):
    short = _study(tmp_path / 'a', 3, {('loco_conv', 0): 85.0, ('loco_conv', 1): 86.0, ('loco_conv', 2): 85.5,
                                        ('e2e_mlp', 0): 85.5, ('e2e_mlp', 1): 85.0, ('e2e_mlp', 2): 86.5,
                                        ('gim_conv', 0): 84.0, ('gim_conv', 1): 84.5, ('gim_conv', 2): 84.0})
    long = _study(tmp_path / 'b', 10, {('loco_conv', 0): 87.0, ('loco_conv', 1): 87.1,
                                        ('e2e_mlp', 0): 87.0, ('e2e_mlp', 1): 87.0, ('gim_conv', 0): 86.0})
    report = trend([long, short])
    assert [b['epochs'] for b in report['budgets']] == [3.0, 10.0]
    e2e = report['budgets'][0]['pairs']['LoCo - E2E']
    assert e2e['diffs'] == [-0.5, 1.0, -1.0] and e2e['mean'] == pytest.approx(-1 / 6, abs=1e-3)
    std = math.sqrt(((-0.5 + 1 / 6) ** 2 + (1 + 1 / 6) ** 2 + (-1 + 1 / 6) ** 2) / 2)
    assert e2e['sem'] == pytest.approx(std / math.sqrt(3), abs=1e-3)
    assert e2e['claim'] == 'unresolved'  # -0.17 +- 2 x 0.60 reaches past both margins
    gim = report['budgets'][0]['pairs']['LoCo - GIM']
    assert gim['diffs'] == [1.0, 1.5, 1.5] and gim['claim'] == 'held'  # 1.33 +- 0.33 > 0
    assert report['budgets'][1]['pairs']['LoCo - E2E']['claim'] == 'held'  # 0.05 +- 0.1 within 0.5
    assert report['budgets'][1]['pairs']['LoCo - GIM']['sem'] is None  # one seed
    assert report['budgets'][1]['per_stage']['loco_conv'] == dict(seeds=[0, 1], linear=[50.0, 87.05])
    moved = report['budgets'][1]['pairs']['LoCo - E2E']['change']  # seeds 0, 1: 0.0 - (-0.5), 0.1 - 1.0
    assert moved['seeds'] == [0, 1] and moved['deltas'] == [0.5, -0.9] and moved['mean'] == pytest.approx(-0.2)
    assert moved['sem'] == pytest.approx(1.4 / math.sqrt(2) / math.sqrt(2), abs=1e-3)  # stdev of 2 = |gap| / sqrt 2
    assert moved['direction'] == 'unresolved' and 'change' not in report['budgets'][0]['pairs']['LoCo - E2E']
    table = trend_markdown(report)
    assert '| 3 | 0, 1, 2 | -0.17 +- 0.60 | unresolved | +1.33 +- 0.17 | held |' in table
    assert '| 10 | LoCo - E2E | 3 | 0, 1 | -0.20 +- 0.70 | unresolved |' in table
    assert '| 10 | LoCo - GIM | 3 | 0 | +0.00 (1 seed) | unresolved |' in table  # 1.0 at both budgets
    write_trend([short, long], tmp_path / 'out')
    assert {p.name for p in (tmp_path / 'out').iterdir()} == {'trend.json', 'trend.md', 'trend.png'}


def test_a_change_between_budgets_is_resolved_when_two_standard_errors_exclude_zero():
    before = dict(seeds=[0, 1, 2], diffs=[-1.0, -0.8, -1.2])
    assert change(before, dict(seeds=[0, 1, 2], diffs=[0.0, 0.1, -0.1]), 3)['direction'] == 'up'  # +1.0 +- 0.06
    assert change(before, dict(seeds=[1, 2, 5], diffs=[-1.8, -2.2, 9.0]), 3) == dict(
        since=3, seeds=[1, 2], deltas=[-1.0, -1.0], mean=-1.0, sem=0.0, direction='down')  # seed 5: no pair
    assert change(before, dict(seeds=[0, 1], diffs=[-0.5, -1.3]), 3)['direction'] == 'unresolved'  # +0.5, -0.5


def test_the_claims_are_judged_on_mean_plus_minus_two_standard_errors():
    assert judge('LoCo - E2E', [0.1, -0.1, 0.0]) == 'held'
    assert judge('LoCo - E2E', [-2.0, -2.2, -1.9]) == 'did not hold (below E2E)'
    assert judge('L2 - E2E', [0.3, 0.9, 0.6]) == 'unresolved (above E2E)'  # 0.6 +- 2 x 0.17: 0.25 to 0.95
    assert judge('L2 - E2E', [0.3, 0.4, -0.4]) == 'unresolved'  # 0.1 +- 2 x 0.25: either side of 0
    assert judge('LoCo - E2E', [-0.4, -0.6, -0.5]) == 'unresolved (below E2E)'  # straddles -0.5, not 0
    assert judge('LoCo - GIM', [-1.0, -1.2, -0.9]) == 'did not hold'
    assert judge('LoCo - E2E', [0.0]) == 'unresolved'  # one seed has no spread to judge by


def test_budgets_must_differ_only_in_epochs(tmp_path):
    a = _study(tmp_path / 'a', 3, {('loco_conv', 0): 85.0})
    b = _study(tmp_path / 'b', 3, {('loco_conv', 0): 86.0})
    with pytest.raises(ValueError, match='both trained 3 epochs: give one folder per budget'):
        trend([a, b])
    c = _study(tmp_path / 'c', 10, {('loco_conv', 0): 86.0}, extra=dict(batch_size=64))
    with pytest.raises(ValueError, match='has another recipe than the other budgets'):
        trend([a, c])


def test_the_l2_ablation_is_held_beside_the_arms_where_a_budget_ran_it(tmp_path):
    three = {('loco_conv', s): v for s, v in enumerate((85.0, 85.4, 85.2))}
    three |= {('e2e_mlp', s): v for s, v in enumerate((85.8, 85.9, 86.1))}
    three |= {('loco_l2_1e-4', s): v for s, v in enumerate((85.9, 86.0, 86.0))}
    ten = {('loco_conv', 0): 87.0, ('e2e_mlp', 0): 87.2}  # no L2 runs at 10 epochs
    report = trend([_study(tmp_path / 'a', 3, three), _study(tmp_path / 'b', 10, ten)])
    l2_loco, l2_e2e = (report['budgets'][0]['pairs'][k] for k in ('L2 - LoCo', 'L2 - E2E'))
    assert l2_loco['diffs'] == [0.9, 0.6, 0.8] and l2_loco['claim'] == 'held'  # 0.77 +- 2 x 0.09 above 0
    assert l2_e2e['diffs'] == [0.1, 0.1, -0.1] and l2_e2e['claim'] == 'held'  # 0.03 +- 2 x 0.07 within 0.5
    assert 'L2 - LoCo' not in report['budgets'][1]['pairs']
    assert report['budgets'][0]['per_stage']['loco_l2_1e-4']['seeds'] == [0, 1, 2]
    table = trend_markdown(report)
    assert '| 3 | 0, 1, 2 | +0.03 +- 0.07 | held | +0.77 +- 0.09 | held |' in table
    assert '| 10 | - | - | - | - | - |' in table  # the budget without L2 runs: a row of dashes
    assert judge('L2 - E2E', [0.1, -0.1, 0.0]) == 'held' and judge('L2 - LoCo', [-1.0, -1.2, -0.9]) == 'did not hold'
    only_three = trend_markdown(trend([_study(tmp_path / 'c', 3, {k: v for k, v in three.items()
                                                                      if k[0] != 'loco_l2_1e-4'})]))
    assert 'L2' not in only_three  # no L2 table where no budget ran it
