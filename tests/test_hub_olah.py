"""Loading for real: exported repositories served by olah (a Hub-compatible server, PyPI) on loopback, fetched by
huggingface_hub in fresh processes: `pretrained=True` through the registry's own hf_hub_id (plugin) and `hf-hub:`
(plain timm, without loco_timm), then offline from the cache; and the missing-weights error from a real server."""
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from zoo_common import FMNIST, reference_logits, train_and_read_out

from loco_timm.data.datasets import find_fashion_mnist
from loco_timm.hub.export import export
from loco_timm.models.tags import get_hub_config, hub_config_dir

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(find_fashion_mnist() is None, reason='Fashion-MNIST not installed'),
              pytest.mark.skipif(shutil.which('git') is None, reason='olah serves git repositories'),
              pytest.mark.xdist_group('olah')]  # one worker starts the server, once
OLAH = Path(sys.executable).parent / 'olah-cli'


def _git_repo(folder: Path, repo: Path) -> None:
    """Turn an export folder into the git repository (branch main) olah serves as models/<org>/<name>."""
    shutil.copytree(folder, repo)
    git = ['git', '-C', str(repo), '-c', 'user.name=loco-timm tests', '-c', 'user.email=tests@localhost']
    for args in (['init', '-q', '-b', 'main'], ['add', '-A'], ['commit', '-q', '-m', 'export']):
        subprocess.run(git + args, check=True, capture_output=True)


@pytest.fixture(scope='module')
def olah(tmp_path_factory):
    if not OLAH.exists():
        pytest.skip('olah is not installed (pip install -e .[test])')
    root = tmp_path_factory.mktemp('olah')
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    (root / 'mirrors' / 'models').mkdir(parents=True)
    (root / 'olah.toml').write_text(f'''[basic]
host = "127.0.0.1"
port = {port}
mirror-netloc = "127.0.0.1:{port}"
mirror-lfs-netloc = "127.0.0.1:{port}"
repos-path = "{root / 'repos'}"
mirrors-path = ["{root / 'mirrors'}"]
[accessibility]
offline = true
''')
    log = open(root / 'olah.out', 'w')
    proc = subprocess.Popen([str(OLAH), '-c', str(root / 'olah.toml'), '--log-path', str(root / 'logs')],
                            cwd=root, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            socket.create_connection(('127.0.0.1', port), timeout=1).close()
            break
        except OSError:
            assert proc.poll() is None, (root / 'olah.out').read_text()[-2000:]
            time.sleep(0.2)
    yield dict(endpoint=f'http://127.0.0.1:{port}', models=root / 'mirrors' / 'models')
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


def _fresh_process(code: str, tmp_path: Path, endpoint: str, cache: Path, offline: bool = False):
    env = {**os.environ, 'HF_ENDPOINT': endpoint, 'HF_HUB_CACHE': str(cache), 'HF_HUB_DISABLE_TELEMETRY': '1',
           'HF_HUB_OFFLINE': '1' if offline else '0', 'HF_HOME': str(tmp_path / 'hf_home')}
    return subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)


LOAD = '''
import sys, torch, timm
from safetensors.torch import load_file, save_file
{imports}
model = timm.create_model({name!r}, pretrained=True).eval()
with torch.no_grad():
    logits = model(load_file({inputs!r})['x'])
save_file({{'logits': logits.contiguous()}}, {outputs!r})
print('loco_timm imported:', 'loco_timm' in sys.modules)
'''


def _load_logits(tmp_path, olah, cache, name, imports, x, offline=False):
    save_file({'x': x}, str(tmp_path / 'x.safetensors'))
    out = tmp_path / f'logits-{len(list(tmp_path.glob("logits-*")))}.safetensors'
    code = LOAD.format(imports=imports, name=name, inputs=str(tmp_path / 'x.safetensors'), outputs=str(out))
    result = _fresh_process(code, tmp_path, olah['endpoint'], cache, offline)
    assert result.returncode == 0, result.stderr[-3000:]
    return load_file(str(out))['logits'], result.stdout


@pytest.fixture(scope='module')
def published(olah, fmnist_run, tmp_path_factory):
    """The main job's tag trained briefly and read out (the shared run: conftest.py), exported and served by olah;
    returns the run folder (only read)."""
    exported = export(fmnist_run, FMNIST, tmp_path_factory.mktemp('published') / 'export', log=lambda *_: None)
    _git_repo(exported, olah['models'] / get_hub_config(FMNIST).repo_id)
    return fmnist_run


X = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope='module')
def hub_cache(olah, published, tmp_path_factory):
    """(the Hub cache, the logits of ``X``) after the plugin's first `pretrained=True` load of the main tag from the
    mirror, in a fresh process; tests copy the cache before they change it."""
    folder = tmp_path_factory.mktemp('hub_cache')
    logits, _ = _load_logits(folder, olah, folder / 'cache', FMNIST, 'import loco_timm', X)
    return folder / 'cache', logits


def _copy_cache(cache: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(cache, tmp_path / 'cache', symlinks=True))  # snapshots link into blobs/


def test_plugin_loads_the_registry_tag_from_the_hub_mirror_then_offline_from_the_cache(olah, published, hub_cache,
                                                                                       tmp_path):
    run, hub = published, get_hub_config(FMNIST)
    expected = reference_logits(run, X)
    cache, online = hub_cache
    torch.testing.assert_close(online, expected, rtol=0, atol=0)
    assert (cache / f'models--{hub.repo_id.replace("/", "--")}').is_dir()
    offline, _ = _load_logits(tmp_path, olah, _copy_cache(cache, tmp_path), FMNIST, 'import loco_timm', X,
                              offline=True)
    torch.testing.assert_close(offline, expected, rtol=0, atol=0)


@pytest.mark.parametrize('recipe, architecture', [
    (FMNIST, 'test_resnet'),  # the main job's recipe on timm's own test_resnet: its export names `test_resnet`
    ('vit_tiny_patch16_224.simclr_fmnist', 'vit_tiny_patch16_224'),  # a cross-family member, tokens not maps
])
def test_plain_timm_loads_an_export_of_a_timm_architecture_without_loco_timm(olah, tmp_path, recipe, architecture):
    """An export of a plain timm architecture (its own constructor arguments in config.json) loads with timm alone
    through `hf-hub:` into the logits of the trained encoder and readout head."""
    repo = f'test-org/{architecture}-fmnist'
    text = (hub_config_dir() / f'{recipe}.yaml').read_text().replace(get_hub_config(recipe).repo_id, repo)
    config = tmp_path / f'{architecture}.simclr_fmnist.yaml'
    config.write_text(text)
    run = train_and_read_out(tmp_path / 'run', str(config))
    exported = export(run, config, tmp_path / 'export', log=lambda *_: None)
    assert 'import loco_timm` not needed' in (exported / 'README.md').read_text()
    _git_repo(exported, olah['models'] / 'test-org' / f'{architecture}-fmnist')
    size = get_hub_config(recipe).model['input_size']
    x = torch.randn(8, *size, generator=torch.Generator().manual_seed(2))
    logits, stdout = _load_logits(tmp_path, olah, tmp_path / 'cache', f'hf-hub:{repo}', '', x)
    assert 'loco_timm imported: False' in stdout
    torch.testing.assert_close(logits, reference_logits(run, x), rtol=0, atol=0)


def test_a_tag_missing_from_the_mirror_raises_the_clear_error(olah, tmp_path):
    code = 'import timm, loco_timm\ntimm.create_model("loco_resnet18_small.gim_simclr_fmnist", pretrained=True)\n'
    result = _fresh_process(code, tmp_path, olah['endpoint'], tmp_path / 'cache')
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith('loco_timm.errors.PretrainedWeightsNotFound: no pretrained weights for '
                           'loco_resnet18_small.gim_simclr_fmnist at loco-timm/loco_resnet18_small.gim_simclr_fmnist '
                           f'on {olah["endpoint"]}')
    assert 'During handling of the above exception' not in result.stderr


@pytest.mark.parametrize('damage', ['truncate', 'flip'])
def test_damaged_weights_in_the_hub_cache_are_one_clear_line(olah, hub_cache, tmp_path, damage):
    hub = get_hub_config(FMNIST)
    cache = _copy_cache(hub_cache[0], tmp_path)
    cached = next(cache.glob(f'models--{hub.repo_id.replace("/", "--")}/snapshots/*/model.safetensors'))
    blob = cached.resolve()
    data = bytearray(blob.read_bytes())
    if damage == 'truncate':
        data = data[:len(data) // 2]
    else:
        data[-100] ^= 0xFF  # same size, one tensor value changed: only the hash can tell
    os.chmod(blob, 0o644)
    blob.write_bytes(bytes(data))
    code = f'import timm, loco_timm\ntimm.create_model({FMNIST!r}, pretrained=True)\n'
    for offline in (False, True):
        result = _fresh_process(code, tmp_path, olah['endpoint'], cache, offline)
        assert result.returncode == 1
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith(f'loco_timm.errors.PretrainedWeightsNotFound: the cached weights of loco_resnet18_small '
                               f'at {cached} are damaged'), result.stderr[-2000:]
        assert '--force-download' in last and 'During handling of the above exception' not in result.stderr


class _Trap:
    """Unpickling this creates a marker file: proof that a file was (or was not) unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path(self.marker).touch, ())


def test_a_repository_with_only_pickled_weights_is_refused_without_unpickling(olah, tmp_path):
    import pickle
    repo = tmp_path / 'pickled'
    repo.mkdir()
    marker = tmp_path / 'unpickled'
    (repo / 'pytorch_model.bin').write_bytes(pickle.dumps({'fc.weight': _Trap(str(marker))}))
    (repo / 'config.json').write_text('{"architecture": "loco_resnet18_small"}')
    _git_repo(repo, olah['models'] / 'test-org' / 'pickled')
    code = ('import timm, loco_timm\ntimm.create_model("loco_resnet18_small", pretrained=True, '
            'pretrained_cfg_overlay=dict(hf_hub_id="test-org/pickled"))\n')
    result = _fresh_process(code, tmp_path, olah['endpoint'], tmp_path / 'cache')
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith('loco_timm.errors.PretrainedWeightsNotFound: test-org/pickled offers only pickled weights '
                           '(pytorch_model.bin)'), result.stderr[-2000:]
    assert not marker.exists() and not list((tmp_path / 'cache').rglob('pytorch_model.bin'))
