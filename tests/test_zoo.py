"""The model zoo: hub configs as the single source of truth, timm registration, model cards, missing weights."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import yaml

import loco_timm  # noqa: F401
from loco_timm.config import ConfigError, ReadoutConfig, TrainConfig, from_dict, load_recipe
from loco_timm.data.datasets import NORMALIZATION
from loco_timm.models import ARCHITECTURES
from loco_timm.models.tags import get_hub_config, hub_config_dir, list_hub_configs, load_hub_config
from tools.cards import update_cards, zoo_card

ROOT = Path(__file__).resolve().parents[1]
FMNIST = 'loco_resnet18_small.simclr_fmnist'
FMNIST_E2E = 'loco_resnet18_small.e2e_simclr_fmnist'


def test_every_hub_config_is_a_valid_recipe_with_consistent_normalisation():
    configs = list_hub_configs()
    assert {c.name for c in configs} >= {FMNIST, 'loco_resnet50.simclr_in1k', 'loco_resnet50.e2e_simclr_in1k',
                                         'loco_resnet50.gim_simclr_in1k', 'loco_resnet18_small.e2e_simclr_fmnist',
                                         'loco_resnet18_small.gim_simclr_fmnist'}
    for hub in configs:
        recipe = hub.recipe()
        train = from_dict(TrainConfig, recipe['train'])
        from_dict(ReadoutConfig, recipe['readout'])
        assert train.backbone == hub.architecture and train.image_size == hub.model['input_size'][-1]
        mean, std = NORMALIZATION[train.dataset]
        assert tuple(hub.model['mean']) == mean and tuple(hub.model['std']) == std, hub.name
        assert len(hub.model.get('label_names') or [None] * hub.model['num_classes']) == hub.model['num_classes']
        assert hub.repo_id == hub.hf_hub_id.split('@')[0] and '/' in hub.repo_id


def test_a_weight_tag_is_a_recipe_for_train_and_readout():
    by_tag = load_recipe(FMNIST)
    by_path = load_recipe(hub_config_dir() / f'{FMNIST}.yaml')
    assert by_tag == by_path
    assert by_tag['train']['backbone'] == 'loco_resnet18_small' and by_tag['train']['mode'] == 'loco'


def test_timm_lists_the_loco_models_and_their_tags():
    assert set(timm.list_models('loco_*')) == {'loco_resnet18_small', 'loco_resnet50', 'loco_shufflenet_v2_50',
                                               'loco_presnet50'}
    # timm's contract: a listed pretrained tag loads; none is published yet, and every tag is still creatable
    assert set(timm.list_pretrained('loco_*')) == {c.name for c in list_hub_configs() if c.published} == set()
    for hub in list_hub_configs():  # tags of plain timm architectures are export-only (loaded through hf-hub:)
        if hub.architecture in ARCHITECTURES:
            assert timm.create_model(hub.name, pretrained=False, device='meta').pretrained_cfg['tag'] == hub.tag


def test_a_published_tag_is_listed_by_timm_and_the_loco_tag_stays_the_default(monkeypatch):
    import dataclasses

    from loco_timm.models import _builder
    from loco_timm.models.resnet import RESNETS
    configs = [dataclasses.replace(c, hub=dict(c.hub, published=True)) if c.name.endswith('e2e_simclr_fmnist') else c
               for c in list_hub_configs()]
    monkeypatch.setattr(_builder, 'list_hub_configs', lambda: configs)
    cfgs = _builder.loco_default_cfgs(RESNETS)
    small = cfgs['loco_resnet18_small']
    assert small.is_pretrained and small.tags[0] == 'simclr_fmnist'  # untagged: still the LoCo tag
    assert small.cfgs['e2e_simclr_fmnist'].hf_hub_id == get_hub_config(FMNIST_E2E).hf_hub_id
    assert small.cfgs['simclr_fmnist'].hf_hub_id is None
    assert not cfgs['loco_resnet50'].is_pretrained and cfgs['loco_resnet50'].tags[0] == 'simclr_in1k'


def test_an_untagged_name_resolves_to_the_loco_tag_and_carries_the_hub_config():
    for arch in ('loco_resnet18_small', 'loco_resnet50', 'loco_shufflenet_v2_50', 'loco_presnet50'):
        model = timm.create_model(arch, pretrained=False)
        hub = get_hub_config(f'{arch}.{model.pretrained_cfg["tag"]}')
        assert hub.mode == 'loco'
        assert model.pretrained_cfg.get('hf_hub_id') == (hub.hf_hub_id if hub.published else None)
        assert model.pretrained_cfg['num_classes'] == hub.model['num_classes'] == model.num_classes
        assert tuple(model.pretrained_cfg['input_size']) == tuple(hub.model['input_size'])


def test_small_resnet_behaves_like_a_timm_model():
    x = torch.randn(2, 1, 28, 28)
    model = timm.create_model(FMNIST).eval()
    assert model(x).shape == (2, 10)
    features = timm.create_model(FMNIST, features_only=True)
    assert [f.shape[1:] for f in features(x)] == [(16, 14, 14), (16, 14, 14), (32, 7, 7), (64, 4, 4), (256, 2, 2)]
    assert features.feature_info.reduction() == [2, 2, 4, 8, 16]
    final, intermediates = model.forward_intermediates(x)
    assert [t.shape[-1] for t in intermediates] == [14, 14, 7, 4, 2]
    torch.testing.assert_close(final, model.forward_features(x))
    assert timm.create_model(FMNIST, num_classes=0)(x).shape == (2, 512)  # fastcatavgmax: average and max pooled
    overlay = timm.create_model(FMNIST, pretrained_cfg_overlay=dict(mean=(0.5,), std=(0.5,)))
    assert overlay.pretrained_cfg['mean'] == (0.5,) and overlay.pretrained_cfg['tag'] == FMNIST.split('.')[1]


def test_loco_resnet50_gives_features_like_timm_resnet50():
    model = timm.create_model('loco_resnet50', features_only=True, out_indices=(1, 2, 3, 4))
    assert model.feature_info.channels() == [256, 512, 1024, 2048]
    assert model.feature_info.reduction() == [4, 8, 16, 32]


def test_loco_resnet50_is_timm_resnet50_so_exports_load_in_plain_timm():
    for hub in list_hub_configs():
        native = hub.model.get('timm_architecture')
        if not native:
            continue
        ours = timm.create_model(hub.name).state_dict()
        theirs = timm.create_model(native).state_dict()
        assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}, hub.name


def test_model_card_and_readme_table_match_the_hub_configs():
    assert update_cards(ROOT, check=True) == [], 'run `python tools/cards.py` and commit MODEL_CARD.md and README.md'
    card = zoo_card()
    for hub in list_hub_configs():
        assert f'`{hub.name}`' in card
    assert 'arXiv:2008.01342' in card and '@inproceedings{xiong2020loco' in card


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def _fmnist_text():
    return (hub_config_dir() / f'{FMNIST}.yaml').read_text()


def test_hub_config_refuses_repeated_keys_bad_repo_ids_and_bad_names(tmp_path):
    repeated = _fmnist_text().replace('train:\n', 'train:\n  backbone: resnet18\n', 1)
    with pytest.raises(ConfigError, match='sets backbone'):
        load_hub_config(_write(tmp_path, f'{FMNIST}.yaml', repeated))
    bad_id = _fmnist_text().replace('hf_hub_id: loco-timm/', 'hf_hub_id: loco timm//', 1)
    with pytest.raises(ConfigError, match='not a valid repo id'):
        load_hub_config(_write(tmp_path, f'{FMNIST}.yaml', bad_id))
    unknown = _fmnist_text().replace('hub:\n', 'hub:\n  mirror: x\n', 1)
    with pytest.raises(ConfigError, match='unknown key.*mirror'):
        load_hub_config(_write(tmp_path, f'{FMNIST}.yaml', unknown))
    with pytest.raises(ConfigError, match='<architecture>.<tag>.yaml'):
        load_hub_config(_write(tmp_path, 'recipe.yaml', _fmnist_text()))
    with pytest.raises(ConfigError, match='unknown weight tag .*valid tags are'):
        get_hub_config('loco_resnet50.nope')


def test_hub_config_yaml_is_read_safely(tmp_path):
    evil = _fmnist_text() + "\nexploit: !!python/object/apply:os.system ['echo pwned']\n"
    with pytest.raises(ConfigError, match='not valid YAML'):
        load_hub_config(_write(tmp_path, f'{FMNIST}.yaml', evil))


@pytest.mark.slow  # a process of its own
def test_pretrained_weights_that_are_not_there_raise_one_clear_error(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE='1', HF_HUB_CACHE=str(tmp_path / 'cache'), HF_HUB_DISABLE_TELEMETRY='1')
    code = ('import timm, loco_timm\n'
            'timm.create_model("loco_resnet50.gim_simclr_in1k", pretrained=True)\n')
    proc = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith('loco_timm.errors.PretrainedWeightsNotFound: no pretrained weights for '
                           'loco_resnet50.gim_simclr_in1k at loco-timm/loco_resnet50.gim_simclr_in1k')
    for hint in ('loco-timm train --config loco_resnet50.gim_simclr_in1k', 'loco-timm publish', 'HF_ENDPOINT'):
        assert hint in last
    assert 'During handling of the above exception' not in proc.stderr  # no chained HTTP stack trace


def test_metrics_in_hub_configs_say_how_they_were_measured():
    for hub in list_hub_configs():
        if hub.metrics:
            assert hub.metrics.get('source') and hub.metrics.get('evaluation'), hub.name
            if 'paper' not in hub.metrics['source']:  # a study's runs record no date: its command says where
                assert hub.metrics.get('command') and (hub.metrics.get('date') or 'study' in hub.metrics['source']), \
                    hub.name
        assert yaml.safe_load(hub.path.read_text())['hub']['published'] in (True, False)


def test_cards_carry_the_study_results_when_there_are_some(tmp_path):
    from tools.cards import STUDY_END, STUDY_RESULTS, STUDY_START, TABLE_END, TABLE_START
    (tmp_path / 'README.md').write_text(f'# x\n{TABLE_START}\n{TABLE_END}\n\n{STUDY_START}\n{STUDY_END}\nend\n')
    assert sorted(update_cards(tmp_path)) == [str(tmp_path / 'MODEL_CARD.md'), str(tmp_path / 'README.md')]
    assert 'Not run yet' in (tmp_path / 'README.md').read_text()
    (tmp_path / STUDY_RESULTS).parent.mkdir(parents=True)
    (tmp_path / STUDY_RESULTS).write_text('| arm | ... |\n| loco_conv | 85.00 +- 0.00 |\n')
    assert update_cards(tmp_path, check=True) == [str(tmp_path / 'MODEL_CARD.md'), str(tmp_path / 'README.md')]
    update_cards(tmp_path)
    for name in ('README.md', 'MODEL_CARD.md'):
        text = (tmp_path / name).read_text()
        assert '| loco_conv | 85.00 +- 0.00 |' in text and 'Not run yet' not in text
    assert (tmp_path / 'README.md').read_text().endswith(f'{STUDY_END}\nend\n')
    assert update_cards(tmp_path, check=True) == []


def test_a_study_records_the_metrics_of_the_tags_it_trained_and_nothing_else(tmp_path):
    """The committed Fashion-MNIST study trained every small tag's recipe at seed 0 (its arms differ only in mode and
    decoder); the 10-epoch study matches no tag. Only the metrics section changes, comments included."""
    import json
    import shutil

    from tools.study_metrics import STUDY_SOURCE, record_study_metrics, study_metrics
    study = ROOT / 'study' / 'fmnist'
    runs = {(r['arm'], r['seed']): r for r in json.loads((study / 'results.json').read_text())['runs']}
    found = study_metrics(study)
    arms = {'loco_resnet18_small.simclr_fmnist': 'loco_conv', 'loco_resnet18_small.e2e_simclr_fmnist': 'e2e_mlp',
            'loco_resnet18_small.gim_simclr_fmnist': 'gim_conv'}
    assert set(found) == set(arms)
    for tag, arm in arms.items():
        assert found[tag]['linear_top1'] == runs[arm, 0]['linear'] and found[tag]['knn_top1'] == runs[arm, 0]['knn']
        assert found[tag]['command'].endswith(f'--arms {arm} --seeds 0')
    # the main job is the LoCo arm's seed 0: the same numbers, recorded by its own command
    assert found[FMNIST]['linear_top1'] == get_hub_config(FMNIST).metrics['linear_top1']
    assert study_metrics(ROOT / 'study' / 'fmnist-10ep') == {}

    shutil.copytree(ROOT / 'hub_configs', tmp_path / 'hub_configs')  # a checkout: hub configs and the study
    (tmp_path / 'study' / 'fmnist').mkdir(parents=True)
    shutil.copy(study / 'results.json', tmp_path / 'study' / 'fmnist')
    study = tmp_path / 'study' / 'fmnist'
    recorded = [t for t in sorted(arms) if t != FMNIST]
    for tag in recorded:  # as they were before any study was recorded: no metrics, a comment on that line
        assert get_hub_config(tag).metrics['source'] == STUDY_SOURCE
        path = tmp_path / 'hub_configs' / f'{tag}.yaml'
        lines = path.read_text().splitlines(keepends=True)
        first = next(i for i, x in enumerate(lines) if x.startswith('metrics:'))
        last = next(i for i in range(first + 1, len(lines)) if not lines[i][0].isspace())
        path.write_text(''.join(lines[:first] + ['metrics: {}  # not measured yet\n'] + lines[last:]))
    before = {p.name: p.read_text() for p in (tmp_path / 'hub_configs').glob('*.yaml')}
    changed = record_study_metrics(study, tmp_path / 'hub_configs')
    assert sorted(Path(p).name for p in changed) == [f'{t}.yaml' for t in recorded]
    for path in (tmp_path / 'hub_configs').glob('*.yaml'):
        hub = load_hub_config(path)
        if path.name in {f'{t}.yaml' for t in arms if t != FMNIST}:
            assert hub.metrics == get_hub_config(hub.name).metrics  # as the repository has them
            assert hub.metrics['linear_top1'] == found[hub.name]['linear_top1']
            old, new = before[path.name].splitlines(), path.read_text().splitlines()
            assert old[:old.index(next(x for x in old if x.startswith('metrics:')))] == \
                new[:new.index('metrics:')]
            assert old[old.index('card:'):] == new[new.index('card:'):]  # the section after it, as written
        else:
            assert path.read_text() == before[path.name]  # the paper's figures, the main job's measurement
    assert record_study_metrics(study, tmp_path / 'hub_configs') == []
