"""Recipes and the command line: validation with one-line errors (exit 2), help, overrides."""
import dataclasses

import pytest
import yaml

from loco_timm import cli
from loco_timm.config import (
    TRAIN_SECTIONS,
    ConfigError,
    ReadoutConfig,
    TrainConfig,
    apply_overrides,
    declared_keys,
    from_dict,
    load_recipe,
    resume_keys,
)
from loco_timm.config.keys import key
from loco_timm.errors import MissingFileError


def test_defaults_are_valid_and_lr_scales_with_batch():
    cfg = TrainConfig(batch_size=1024, base_lr=0.3)
    assert cfg.lr == pytest.approx(1.2)


@pytest.mark.parametrize('values,match', [
    ({'bogus': 1}, r'unknown key\(s\) bogus in train: valid keys are backbone, model_args, mode'),
    ({'mode': 'bp'}, "mode='bp' is not valid: choose one of e2e, gim, loco"),
    ({'dataset': 'mnist'}, "dataset='mnist' is not valid: choose one of fashion_mnist"),
    ({'batch_size': 'big'}, "batch_size='big' has the wrong type: expected int"),
    ({'batch_size': 0}, 'batch_size=0 must be >= 1'),
    ({'grad_accumulation': 4}, 'grad_accumulation=4 is refused: accumulating gradients over micro-batches'),
    ({'crop_scale': [0.5, 0.2]}, r'crop_scale=\[0.5, 0.2\] must be \[min, max\]'),
    ({'mixed_precision': 'fp8'}, "mixed_precision='fp8' is not valid"),
])
def test_bad_train_values_name_the_key_and_the_fix(values, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(TrainConfig, values, where='train')


def test_yaml_exponents_and_ints_become_floats():
    cfg = from_dict(TrainConfig, yaml.safe_load('weight_decay: 1e-6\nepochs: 3\nbase_lr: 1'))
    assert (cfg.weight_decay, cfg.epochs, cfg.base_lr) == (1e-6, 3.0, 1.0)


def test_overrides_are_parsed_as_yaml_and_checked():
    merged = apply_overrides({'epochs': 2}, {'units': '[[0, 1], [1, 2]]', 'top_unit': 'true'}, TrainConfig)
    assert merged == {'epochs': 2, 'units': [[0, 1], [1, 2]], 'top_unit': True}
    with pytest.raises(ConfigError, match='unknown option nope'):
        apply_overrides({}, {'nope': '1'}, TrainConfig)


def test_recipe_sections_are_checked(tmp_path):
    path = tmp_path / 'r.yaml'
    path.write_text('train: {epochs: 1}\nextra: {}\n')
    with pytest.raises(ConfigError, match=r'unknown section\(s\) extra .*valid sections are train, readout'):
        load_recipe(path)
    with pytest.raises(ConfigError, match='does not exist'):
        load_recipe(tmp_path / 'missing.yaml')


def test_readout_config_checks_values():
    with pytest.raises(ConfigError, match="knn_k='many' has the wrong type"):
        ReadoutConfig(knn_k='many')


def _cli_error(capsys, *argv):
    assert cli.main(list(argv)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_cli_unknown_recipe_key_is_one_line_exit_2(tmp_path, capsys):
    recipe = tmp_path / 'r.yaml'
    recipe.write_text('train: {epochz: 1}\n')
    line = _cli_error(capsys, 'train', '--config', str(recipe), '--out-dir', str(tmp_path))
    assert line.startswith(f'loco-timm train: error: unknown key(s) epochz in train: section of {recipe}: valid keys')


def test_cli_bad_value_is_one_line_exit_2(tmp_path, capsys):
    line = _cli_error(capsys, 'train', '--mode', 'backprop', '--out-dir', str(tmp_path))
    assert line == "loco-timm train: error: mode='backprop' is not valid: choose one of e2e, gim, loco"


def test_cli_unwritable_out_dir(tmp_path, capsys):
    blocker = tmp_path / 'file'
    blocker.write_text('')
    line = _cli_error(capsys, 'train', '--out-dir', str(blocker / 'run'))
    assert line.startswith(f'loco-timm train: error: out_dir {blocker / "run"} is not writable')


def test_cli_missing_imagefolder(tmp_path, capsys):
    line = _cli_error(capsys, 'train', '--dataset', 'imagefolder', '--data-dir', str(tmp_path / 'nope'),
                      '--out-dir', str(tmp_path / 'run'), '--trackers', 'none')
    assert "data_dir '" in line and 'does not exist: imagefolder needs data_dir holding <split>/<class>' in line


def test_cli_empty_imagefolder(tmp_path, capsys):
    (tmp_path / 'data' / 'train').mkdir(parents=True)
    line = _cli_error(capsys, 'train', '--dataset', 'imagefolder', '--data-dir', str(tmp_path / 'data'),
                      '--out-dir', str(tmp_path / 'run'), '--trackers', 'none')
    assert 'could not be read in' in line and 'Found 0 images' in line


def test_cli_unknown_backbone(tmp_path, capsys):
    line = _cli_error(capsys, 'train', '--backbone', 'resnet5000', '--subset', '64', '--batch-size', '16',
                      '--out-dir', str(tmp_path), '--trackers', 'none')
    assert line.startswith("loco-timm train: error: unknown backbone 'resnet5000'")


def test_cli_readout_without_checkpoint(tmp_path, capsys):
    line = _cli_error(capsys, 'readout', str(tmp_path))
    assert line.startswith(f'loco-timm readout: error: no complete checkpoint in {tmp_path}')


@pytest.mark.parametrize('command', [[], ['train'], ['readout']])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(command + ['--help'])
    assert exit_info.value.code == 0
    assert 'usage: loco-timm' in capsys.readouterr().out


def test_cli_refuses_to_overwrite_a_run_without_resume(tmp_path, capsys):
    (tmp_path / 'checkpoints' / 'step-00000001').mkdir(parents=True)
    for name in ('progress.json', 'learner.safetensors'):
        (tmp_path / 'checkpoints' / 'step-00000001' / name).write_text('{}')
    line = _cli_error(capsys, 'train', '--subset', '64', '--batch-size', '16', '--out-dir', str(tmp_path),
                      '--trackers', 'none')
    assert line.endswith('already holds checkpoints (step-00000001): pass --resume to continue that run, or choose '
                         'a new --out-dir')


def test_every_hub_config_is_a_valid_recipe():
    from pathlib import Path
    paths = sorted((Path(__file__).parent.parent / 'hub_configs').glob('*.yaml'))
    assert paths
    for path in paths:
        recipe = load_recipe(path)
        from_dict(TrainConfig, recipe['train'], where=f'{path} train')
        from_dict(ReadoutConfig, recipe.get('readout') or {}, where=f'{path} readout')


def test_cards_tool_from_a_missing_study_names_it_and_refuses_check(tmp_path, capsys):
    from tools import cards
    with pytest.raises(MissingFileError, match='no study results here; run loco-timm study --out'):
        cards.main(['--root', str(tmp_path), '--from-study', str(tmp_path / 'nowhere')])
    with pytest.raises(SystemExit) as exit_info:
        cards.main(['--check', '--from-study', 'study/fmnist'])
    assert exit_info.value.code == 2
    assert '--from-study writes hub configs: run it without --check' in capsys.readouterr().err


@pytest.mark.parametrize('cls', [TrainConfig, ReadoutConfig])
def test_every_recipe_key_is_declared_with_section_help_and_resume_rule(cls):
    keys = declared_keys(cls)
    assert [k.name for k in keys] == [f.name for f in dataclasses.fields(cls)]
    for k in keys:
        assert k.help and isinstance(k.resume, bool), k
    assert {k.section for k in declared_keys(TrainConfig)} == set(TRAIN_SECTIONS)


def test_a_key_declared_without_its_rules_is_refused():
    @dataclasses.dataclass
    class Sloppy:
        declared: int = key(1, section='data', help='fine', resume=True)
        forgotten: int = 2

    with pytest.raises(TypeError, match='Sloppy.forgotten is not declared with'):
        declared_keys(Sloppy)


def test_resume_keys_come_from_the_declarations():
    keys = resume_keys()
    changes_the_run = {'backbone', 'mode', 'batch_size', 'seed', 'crop_scale', 'pipelined', 'sync_bn',
                       'mixed_precision'}
    assert changes_the_run <= set(keys)
    assert not {'out_dir', 'num_workers', 'data_dir', 'checkpoint_every', 'recompute', 'placement'} & set(keys)


def test_choices_come_from_the_modules_that_define_them():
    from loco_timm.core.decoders import NORMS
    from loco_timm.core.sharing import SHARING
    from loco_timm.core.units import MODES
    choices = {k.name: k.choices for k in declared_keys(TrainConfig)}
    assert choices['mode'] == MODES and choices['sharing'] == SHARING and choices['decoder_norm'] == NORMS


@pytest.mark.parametrize('flag', ['--batch_size', '--batch-size'])
def test_options_take_the_recipe_spelling_and_the_dashed_one(flag):
    args = cli.build_parser().parse_args(['train', flag, '64', '--out_dir', 'x'])
    assert cli.config_from_args(args, TrainConfig, 'train').batch_size == 64
