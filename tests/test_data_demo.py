"""Fashion-MNIST lookup (the embedded default) and the demo on a real batch."""
import gzip

import pytest

from loco_timm.data import datasets as data


def _write_idx_files(folder, packed):
    folder.mkdir(parents=True, exist_ok=True)
    for name in data.FASHION_MNIST_FILES:
        (folder / (name + '.gz' if packed else name)).write_bytes(gzip.compress(b'x') if packed else b'x')


def test_data_dir_is_searched_first(tmp_path, monkeypatch):
    monkeypatch.delenv('LOCO_TIMM_DATA', raising=False)
    _write_idx_files(tmp_path / 'mine', packed=False)
    assert data.find_fashion_mnist(tmp_path / 'mine') == tmp_path / 'mine'


def test_env_var_and_torchvision_layout_are_found(tmp_path, monkeypatch):
    _write_idx_files(tmp_path / 'FashionMNIST' / 'raw', packed=True)
    monkeypatch.setenv('LOCO_TIMM_DATA', str(tmp_path))
    assert data.find_fashion_mnist(None) == tmp_path / 'FashionMNIST' / 'raw'


def test_missing_data_without_download_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.delenv('LOCO_TIMM_DATA', raising=False)
    monkeypatch.setattr(data, 'DEBIAN_FASHION_MNIST', tmp_path / 'absent')
    with pytest.raises(FileNotFoundError, match='apt-get install dataset-fashion-mnist'):
        data.fashion_mnist(data_dir=tmp_path / 'empty', download=False)


needs_debian_data = pytest.mark.skipif(data.find_fashion_mnist() is None,
                                       reason='Fashion-MNIST not installed (scripts/run.sh installs it)')


@needs_debian_data
def test_debian_fashion_mnist_loads_through_torchvision(tmp_path, monkeypatch):
    monkeypatch.setenv('LOCO_TIMM_CACHE', str(tmp_path))
    train, test = data.fashion_mnist(train=True), data.fashion_mnist(train=False)
    assert (len(train), len(test)) == (60000, 10000)
    image, label = train[0]
    assert image.size == (28, 28) and 0 <= label < 10


@pytest.mark.slow
@needs_debian_data
def test_demo_trains_all_modes_on_a_real_batch(tmp_path, monkeypatch, capsys):
    from loco_timm import demo
    monkeypatch.setenv('LOCO_TIMM_CACHE', str(tmp_path))
    history = demo.main(['--images', '32', '--steps', '3'])
    assert {mode: len(history[mode][0]) for mode in history} == {'e2e': 1, 'gim': 4, 'loco': 3}
    assert 'loco units' in capsys.readouterr().out
