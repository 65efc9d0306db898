"""`loco-timm export` and `loco-timm publish`: Hub repository folders that timm loads, and their checks."""
import json

import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file
from zoo_common import FMNIST, cli, reference_logits

import loco_timm  # noqa: F401
from loco_timm.config import ConfigError, load_recipe
from loco_timm.data.datasets import find_fashion_mnist
from loco_timm.hub.export import EXPORT_FILES, build_export_model, export
from loco_timm.hub.publish import publish
from loco_timm.models.tags import get_hub_config
from loco_timm.training.checkpoint import resolve_checkpoint

pytestmark = pytest.mark.skipif(find_fashion_mnist() is None, reason='Fashion-MNIST not installed')
# slow: the tests that read the trained run (conftest.py: trained through the command line, once per test run)
# or start a process of their own
slow = pytest.mark.slow


@pytest.fixture(scope='module')
def run_dir(fmnist_run):
    """The shared tiny run, trained and read out once per test run (conftest.py); only read here."""
    return fmnist_run


@pytest.fixture(scope='module')
def exported(run_dir, tmp_path_factory):
    return export(run_dir, FMNIST, tmp_path_factory.mktemp('export') / 'repo', log=lambda *_: None)


@slow
def test_export_writes_a_timm_hub_repository_without_pickled_weights(exported):
    assert sorted(p.name for p in exported.iterdir()) == sorted(EXPORT_FILES + (f'{FMNIST}.yaml',))
    assert not [p for p in exported.rglob('*') if p.suffix in ('.bin', '.pt', '.pth', '.pkl')]
    config = json.loads((exported / 'config.json').read_text())
    hub = get_hub_config(FMNIST)
    assert config['architecture'] == 'loco_resnet18_small' and config['num_classes'] == 10
    assert config['label_names'] == hub.model['label_names']
    assert config['pretrained_cfg']['tag'] == 'simclr_fmnist'
    assert list(config['pretrained_cfg']['input_size']) == hub.model['input_size']


@slow
def test_exported_weights_give_the_trained_model_logits(run_dir, exported):
    x = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    model = timm.create_model(FMNIST, pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(exported / 'model.safetensors'))).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_logits(run_dir, x), rtol=0, atol=0)


@slow
def test_export_keeps_the_full_learner_state_for_further_training(run_dir, exported):
    ours = load_file(str(exported / 'learner.safetensors'))
    theirs = load_file(str(resolve_checkpoint(run_dir) / 'learner.safetensors'))
    assert ours.keys() == theirs.keys() and any(k.startswith('decoders.') for k in ours)
    for key in theirs:
        assert torch.equal(ours[key], theirs[key])
    assert load_recipe(exported / f'{FMNIST}.yaml') == load_recipe(FMNIST)  # `loco-timm train --config` it


@slow
def test_model_card_has_hub_front_matter_and_the_measured_readout(exported):
    text = (exported / 'README.md').read_text()
    front, body = text.split('---\n', 2)[1:]
    meta = yaml.safe_load(front)
    results = json.loads((exported / 'readout.json').read_text())
    assert meta['library_name'] == 'timm' and meta['license'] == 'apache-2.0'
    assert meta['datasets'] == ['zalando-datasets/fashion_mnist'] and 'loco' in meta['tags']
    metric = meta['model-index'][0]['results'][0]['metrics'][0]
    assert metric['value'] == results['rows']['model']['linear'][-1]
    for part in ('import loco_timm', '## Training recipe', '| model (linear) |', '| pixels (linear) |',
                 '![per-stage readout](readout.png)', '## Limitations', '@inproceedings{xiong2020loco', '2008.01342'):
        assert part in body, part


@slow
def test_export_refuses_a_missing_or_stale_readout_an_occupied_folder_and_the_wrong_tag(run_dir, exported, tmp_path):
    with pytest.raises(FileExistsError, match='not empty'):
        export(run_dir, FMNIST, exported)
    with pytest.raises(ConfigError, match='was not trained as loco_resnet50.simclr_in1k'):
        export(run_dir, 'loco_resnet50.simclr_in1k', tmp_path / 'a')
    with pytest.raises(FileNotFoundError, match='run `loco-timm readout'):
        export(run_dir, FMNIST, tmp_path / 'b', readout_dir=tmp_path)
    stale = tmp_path / 'stale'
    stale.mkdir()
    results = json.loads((run_dir / 'readout.json').read_text())
    (stale / 'readout.json').write_text(json.dumps(dict(results, checkpoint='/elsewhere/step-00000001')))
    (stale / 'readout_head.safetensors').write_bytes((run_dir / 'readout_head.safetensors').read_bytes())
    with pytest.raises(ValueError, match='evaluates /elsewhere'):
        export(run_dir, FMNIST, tmp_path / 'c', readout_dir=stale)
    assert not (tmp_path / 'a').exists() and not (tmp_path / 'b').exists() and not (tmp_path / 'c').exists()
    result = cli('export', run_dir, '--config', 'loco_resnet50.simclr_in1k', '--out', tmp_path / 'd')
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert 'was not trained as loco_resnet50.simclr_in1k' in result.stderr


def test_tensors_that_do_not_fit_the_architecture_are_named():
    hub = get_hub_config(FMNIST)
    state = timm.create_model(FMNIST).state_dict()
    head = {'fc.weight': state.pop('fc.weight'), 'fc.bias': state.pop('fc.bias')}
    state['layer9.weight'] = state.pop('layer1.0.conv1.weight')
    state['conv1.0.weight'] = torch.zeros(8, 3, 3, 3)
    with pytest.raises(ValueError, match=r'missing: layer1.0.conv1.weight; unexpected: layer9.weight; '
                                         r'wrong shape: conv1.0.weight'):
        build_export_model(hub, state, head)


def _no_token_env(tmp_path):
    return {'HF_HOME': str(tmp_path / 'hf'), 'HF_TOKEN': '', 'HF_HUB_DISABLE_TELEMETRY': '1'}


@pytest.mark.parametrize('tag', ['convnext_atto.simclr_fmnist', 'swin_tiny_patch4_window7_224.simclr_fmnist'])
def test_a_family_export_describes_the_tag_inputs_not_the_architecture_defaults(tag):
    """timm's convnext_atto config says 224 px, tests at 288 px and pools a 7x7 map; the tag's export says 32 px,
    no test size, and the 1x1 map it pools there (Swin, NHWC: 2x2 at 28 px)."""
    hub = get_hub_config(tag)
    torch.manual_seed(0)
    state = timm.create_model(hub.architecture, num_classes=10, in_chans=1, **hub.model_args).state_dict()
    head = {k.split('.', 2)[-1]: state.pop(k) for k in [k for k in state if k.startswith('head.fc.')]}
    model = build_export_model(hub, state, head)
    cfg = model.pretrained_cfg
    assert tuple(cfg['input_size']) == tuple(hub.model['input_size']) and cfg['tag'] == 'simclr_fmnist'
    assert 'test_input_size' not in cfg and 'test_crop_pct' not in cfg
    size = tuple(hub.model['input_size'])
    assert timm.data.resolve_data_config(model=model, use_test_size=True)['input_size'] == size
    with torch.no_grad():
        features = model.forward_features(torch.zeros(1, *hub.model['input_size']))
    spatial = features.shape[1:3] if getattr(model, 'output_fmt', 'NCHW') == 'NHWC' else features.shape[2:]
    assert tuple(cfg['pool_size']) == tuple(spatial) == ((1, 1) if 'convnext' in tag else (2, 2))


@slow
def test_publish_without_a_token_is_one_clear_line(exported, tmp_path):
    result = cli('publish', exported, '--repo-id', 'loco-timm/test', env=_no_token_env(tmp_path))
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1
    assert 'no Hugging Face token' in result.stderr and 'hf auth login' in result.stderr


@slow
def test_publish_without_network_is_one_clear_line(exported, tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]  # closed once the with-block ends: connection refused
    env = dict(_no_token_env(tmp_path), HF_TOKEN='hf_fake', HF_ENDPOINT=f'http://127.0.0.1:{port}')
    result = cli('publish', exported, '--repo-id', 'loco-timm/test', env=env)
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert 'upload of' in result.stderr and 'failed' in result.stderr and f'127.0.0.1:{port}' in result.stderr


@slow
def test_publish_refuses_bad_repo_ids_and_pickled_files(exported, tmp_path):
    for bad in ('no-owner', 'org/has space', 'org//x', '../etc'):
        with pytest.raises(ValueError, match='repo id'):
            publish(exported, bad, token='hf_fake')
    folder = tmp_path / 'repo'
    folder.mkdir()
    for name in ('model.safetensors', 'config.json', 'README.md'):
        (folder / name).write_bytes((exported / name).read_bytes())
    (folder / 'pytorch_model.bin').write_bytes(b'pickle')
    with pytest.raises(ValueError, match='pickled files .*pytorch_model.bin'):
        publish(folder, 'org/name', token='hf_fake')


@slow
def test_publish_uploads_the_folder_and_again_the_same(exported, monkeypatch):
    import huggingface_hub
    calls = []
    monkeypatch.setattr(huggingface_hub.HfApi, 'create_repo',
                        lambda self, repo_id, **kw: calls.append(('create_repo', repo_id, kw)))
    monkeypatch.setattr(huggingface_hub.HfApi, 'upload_folder',
                        lambda self, **kw: calls.append(('upload_folder', kw)) or 'https://hub/commit/1')
    before = {p.name: p.read_bytes() for p in exported.iterdir()}
    for _ in range(2):
        assert publish(exported, 'loco-timm/test', token='hf_fake', log=lambda *_: None) == 'https://hub/commit/1'
    assert calls[0] == calls[2] and calls[1] == calls[3]
    assert calls[0] == ('create_repo', 'loco-timm/test', dict(repo_type='model', private=False, exist_ok=True))
    upload = calls[1][1]
    assert upload['repo_id'] == 'loco-timm/test' and upload['folder_path'] == str(exported)
    assert '*.bin' in upload['ignore_patterns'] and upload['commit_message'].startswith(f'Upload {FMNIST}')
    assert {p.name: p.read_bytes() for p in exported.iterdir()} == before


@slow
def test_a_loco_resnet50_export_names_resnet50_and_loads_in_plain_timm(tmp_path):
    import subprocess
    import sys

    from loco_timm.hub.export import save_timm_model
    hub = get_hub_config('loco_resnet50.simclr_in1k')
    torch.manual_seed(0)
    state = timm.create_model(hub.name).state_dict()
    head = {k: state.pop(k) for k in ('fc.weight', 'fc.bias')}
    model = build_export_model(hub, state, head)
    save_timm_model(model, hub, tmp_path)
    config = json.loads((tmp_path / 'config.json').read_text())
    assert config['architecture'] == 'resnet50' and config['num_classes'] == 1000
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    from safetensors.torch import save_file
    save_file({'x': x}, str(tmp_path / 'x.safetensors'))
    code = ('import sys, timm, torch\nfrom safetensors.torch import load_file, save_file\n'
            f'm = timm.create_model("local-dir:{tmp_path}", pretrained=True).eval()\n'
            f'save_file({{"y": m(load_file("{tmp_path}/x.safetensors")["x"]).detach()}}, "{tmp_path}/y.safetensors")\n'
            'print(type(m).__name__, "loco_timm" in sys.modules)\n')
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ['ResNet', 'False']
    with torch.no_grad():
        torch.testing.assert_close(load_file(str(tmp_path / 'y.safetensors'))['y'], model(x), rtol=0, atol=0)
