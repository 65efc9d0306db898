"""The cross-family table (benchmarks/families.py) from recorded runs: paired per-seed differences with their
standard error and judgement, per-stage means, the seeds every arm ran, and the cost ratios, against hand-computed
values."""
import json
import math

import pytest

from benchmarks import families
from tools.anatomy import anatomy
from tools.macs import macs_and_params

# last-stage linear top-1 per (arm, seed); earlier stages are the last minus 3, 2, 1
LAST = {('e2e_mlp', 0): 80.0, ('e2e_mlp', 1): 81.0, ('e2e_mlp', 2): 79.0,
        ('gim_conv', 0): 77.0, ('gim_conv', 1): 78.5, ('gim_conv', 2): 76.0,
        ('loco_conv', 0): 79.9, ('loco_conv', 1): 80.8, ('loco_conv', 2): 79.3}
REFERENCES = dict(random_init=[50.0, 51.0, 52.0, 53.0], pixels=[84.5])
COST = dict(macs=2e7, params=3e6, machine='test machine', date='2026-12-07',
            modes=dict(e2e=dict(peak_saved_bytes=300.0, step_seconds=1.0),
                       gim=dict(peak_saved_bytes=100.0, step_seconds=1.25),
                       loco=dict(peak_saved_bytes=150.0, step_seconds=1.5)))


@pytest.fixture
def recorded(tmp_path, monkeypatch):
    def write(family, runs):
        folder = tmp_path / family
        folder.mkdir()
        (folder / 'results.json').write_text(json.dumps(dict(runs=runs)))
    runs = [dict(arm=arm, seed=seed, linear=[v - 3, v - 2, v - 1, v], references=REFERENCES)
            for (arm, seed), v in LAST.items()]
    write('convnext', runs)
    write('regnet', [r for r in runs if not (r['arm'] == 'loco_conv' and r['seed'] == 2)])  # one run missing
    monkeypatch.setattr(families, 'study_folder', lambda family: tmp_path / family)


def test_a_family_row_pairs_each_seed_and_judges_the_mean_with_its_standard_error(recorded):
    row = families.summarize('convnext', COST)
    e2e = [LAST[('loco_conv', s)] - LAST[('e2e_mlp', s)] for s in range(3)]  # -0.1, -0.2, +0.3
    gim = [LAST[('loco_conv', s)] - LAST[('gim_conv', s)] for s in range(3)]  # 2.9, 2.3, 3.3
    for label, diffs, judgement in (('LoCo - E2E', e2e, 'held'), ('LoCo - GIM', gim, 'held')):
        pair = row['pairs'][label]
        mean = sum(diffs) / 3
        se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2) / math.sqrt(3)
        assert pair['diffs'] == pytest.approx(diffs) and pair['mean'] == pytest.approx(mean)
        assert pair['se'] == pytest.approx(se) and pair['judgement'] == judgement, (label, pair)
    assert row['per_stage']['gim_conv'] == pytest.approx([74.17, 75.17, 76.17, 77.17], abs=0.01)
    assert row['saving'] == pytest.approx(dict(gim=3.0, loco=2.0))  # E2E's peak over the arm's
    assert row['time'] == pytest.approx(dict(gim=1.25, loco=1.5))  # the arm's step over E2E's


def test_the_table_names_what_did_not_run_and_pairs_only_seeds_every_arm_ran(recorded):
    rows = [families.summarize(f, COST if f == 'convnext' else None) for f in ('convnext', 'regnet')]
    rows[0]['family'] = families.REFERENCE  # the row the MACs are compared with
    assert rows[1]['pairs']['LoCo - E2E']['diffs'] == pytest.approx([-0.1, -0.2])  # seed 2 has no LoCo run
    table = families.markdown(rows).splitlines()
    assert table[:4] == families.summary_table(rows)  # the README's copy is the page's first table
    reference, regnet = (next(line for line in table if line.startswith(f'| {name} |'))
                         for name in (families.REFERENCE, 'regnet'))
    assert '| 20.0 M (1.00x) | 3.00 M | 0, 1, 2 |' in reference and '| 2.00x / 3.00x | 1.50x / 1.25x |' in reference
    assert '| - | - | 0, 1 |' in regnet and regnet.endswith('| - | - |')  # no costs measured
    stages = [line for line in table if line.startswith('| regnet |')][-1]  # the per-stage table's row
    assert stages.endswith('| 50.00, 51.00, 52.00, 53.00 | 84.50 |')  # random init, pixels
    empty = families.summarize('efficientnet', None)
    assert families.markdown([empty]).splitlines()[2].count('not run') == 2


def test_the_findings_count_each_claim_per_family_and_name_families_below_the_pixels(recorded):
    rows = [families.summarize(f, None) for f in ('convnext', 'regnet')]
    rows[0]['references'] = dict(pixels=[75.0], random_init=[79.5])  # convnext's arms read out above the pixels,
    # regnet's (80-81) below 84.5; convnext's GIM (mean 77.17) below its untrained network, E2E (80) and LoCo not
    rows[1]['pairs']['LoCo - E2E'].update(judgement='unresolved')
    lines = families.findings(rows)
    assert '- LoCo within 0.5 pt of E2E: held in convnext (3); unresolved in regnet (2).' in lines
    assert '- LoCo above GIM: held in convnext (3), regnet (2).' in lines
    assert lines[-2] == '- Every arm below the linear readout of the pixels at the last stage: regnet.'
    assert lines[-1] == '- Arms whose mean reads out below the same network untrained at the last stage: convnext ' \
                        '(gim_conv).'
    assert families.findings([families.summarize('efficientnet', None)]) == []  # nothing run, nothing said


def test_a_stopped_table_says_so_in_one_line_with_the_pre_emption_status(monkeypatch, capsys):
    from loco_timm.errors import Preempted

    def stopped(families_, seeds):
        raise Preempted('stopped by SIGTERM after step 79 of 1404: checkpoint written; continue with --resume')
    monkeypatch.setattr(families, 'run_studies', stopped)
    monkeypatch.setattr('sys.argv', ['families.py', '--families', 'convnext', '--no-costs'])
    assert families.main() == Preempted.exit_code != 0
    assert capsys.readouterr().err == 'families: stopped by SIGTERM after step 79 of 1404: checkpoint written; ' \
                                      'continue with --resume\n'


def test_the_anatomy_of_a_member_is_its_stages_maps_macs_norms_and_attention():
    """The ResNet reference at 28 px halves its map four times (14, 7, 4, 2); the CoAtNet member (32 px) has two
    convolution stages with batch norm and two transformer stages of two attention blocks with layer norm; the
    stages' multiply-adds add up to the whole forward_features'."""
    resnet = anatomy(families.FAMILIES[families.REFERENCE])
    assert resnet['grids'] == ['14x14', '7x7', '4x4', '2x2'] and resnet['channels'] == [16, 32, 64, 256]
    assert sum(resnet['macs']) == macs_and_params(families.FAMILIES[families.REFERENCE])[0]
    assert [list(n) for n in resnet['norms']] == [['BatchNorm2d']] * 4 and resnet['attention'] == [{}] * 4
    hybrid = anatomy(families.FAMILIES['maxxvit'])
    assert hybrid['grids'] == ['8x8', '4x4', '2x2', '1x1']
    assert [next(iter(n)) for n in hybrid['norms']] == ['BatchNormAct2d'] * 2 + ['LayerNorm2d'] * 2
    assert hybrid['attention'] == [{}, {}, {'Attention2d': 2}, {'Attention2d': 2}]
    row = families.anatomy_lines([dict(family='maxxvit', anatomy=hybrid)])[-1]
    shares = [round(100 * m / sum(hybrid['macs'])) for m in hybrid['macs']]
    assert row == (f'| maxxvit | 8x8 (48), 4x4 (96), 2x2 (192), 1x1 (384) | '
                   f'NCHW: Bottleneck | {", ".join(map(str, shares))} | BatchNormAct2d, BatchNormAct2d, '
                   f'LayerNorm2d, LayerNorm2d | 0, 0, 2, 2 (Attention2d) |')


def test_a_vit_stage_counts_its_blocks_attention_and_its_tokens_without_the_class_token():
    vit = anatomy(families.FAMILIES['vision_transformer'])  # 28 px in 4 px patches: 7x7 tokens and a class token
    assert vit['grids'] == ['7x7'] * 4 and vit['attention'] == [{'Attention': 2}] * 4  # 8 blocks in 4 stages
    row = families.anatomy_lines([dict(family='vit', anatomy=vit)])[-1]
    assert row.endswith('| NLC: Block | 25, 25, 25, 25 | LayerNorm | 2, 2, 2, 2 (Attention) |')


def test_the_families_are_grouped_by_each_property_with_the_mean_and_range_of_their_means(recorded):
    rows = [dict(families.summarize(f, None), anatomy=dict(norms=norms, attention=attention, macs=macs))
            for f, norms, attention, macs in (('convnext', [{'LayerNorm2d': 3}] * 2, [{}] * 2, [5, 5]),
                                              ('regnet', [{'BatchNormAct2d': 5}] * 2, [{}] * 2, [4, 6]))]
    rows.append(dict(rows[0], family='hybrid', anatomy=dict(norms=[{'BatchNorm2d': 2}, {'LayerNorm': 1}],
                                                           attention=[{}, {'Attention2d': 2}], macs=[3, 7])))
    rows[2]['pairs'] = {'LoCo - E2E': dict(rows[0]['pairs']['LoCo - E2E'], mean=-1.0)}  # no GIM pair
    lines = families.grouped(rows)
    # LoCo - E2E means: convnext 0.0 (-0.1, -0.2, +0.3), regnet -0.15 (seeds 0, 1), hybrid -1.0
    assert lines[0] == ('- LoCo - E2E by normalisation, mean of the family means: BatchNorm -0.15 (1: regnet); '
                        'BatchNorm and LayerNorm -1.00 (1: hybrid); LayerNorm +0.00 (1: convnext).')
    assert lines[1] == ('- LoCo - E2E by self-attention, mean of the family means: with -1.00 (1: hybrid); '
                        'without -0.07 (2: convnext, regnet, -0.15 to +0.00).')
    assert lines[2] == ('- LoCo - E2E by stage balance, mean of the family means: most MACs in an earlier stage '
                        '+0.00 (1: convnext); most MACs in the last stage -0.57 (2: regnet, hybrid, -1.00 to -0.15).')
    assert len(lines) == 5 and lines[3].startswith('- LoCo - GIM by normalisation')  # the hybrid has no GIM pair:
    # by self-attention every family left is without; every family has 2 stages: no line by stage count
    assert lines[4].startswith('- LoCo - GIM by stage balance')
