"""CIFAR-10/100 and STL-10 given files in torchvision's layout (no network here): small fake files in the exact
formats, with torchvision's MD5 checks switched off, go through the real loaders into uint8 image tensors."""
import pickle

import numpy as np
import pytest
import torch
import torchvision.datasets.cifar as tv_cifar
from torchvision.datasets import CIFAR10, CIFAR100, STL10

from loco_timm.data.datasets import build_dataset


@pytest.fixture
def no_md5(monkeypatch):
    for cls in (CIFAR10, CIFAR100, STL10):
        monkeypatch.setattr(cls, '_check_integrity', lambda self: True)
    monkeypatch.setattr(tv_cifar, 'check_integrity', lambda *args, **kwargs: True)


def _cifar(root, cls, n=6):
    folder = root / cls.base_folder
    folder.mkdir(parents=True)
    label_key = 'labels' if cls is CIFAR10 else 'fine_labels'
    rng = np.random.default_rng(0)
    for k, (name, _) in enumerate(cls.train_list + cls.test_list):
        data = np.full((n, 3 * 32 * 32), k, dtype=np.uint8)
        data[:, :1024] = rng.integers(0, 256, (n, 1024))  # red plane varies
        with open(folder / name, 'wb') as f:
            pickle.dump({'data': data, label_key: [i % 3 for i in range(n)]}, f)
    names = [f'class{i}' for i in range(10 if cls is CIFAR10 else 100)]
    with open(folder / cls.meta['filename'], 'wb') as f:
        pickle.dump({cls.meta['key']: names}, f)
    return root


@pytest.mark.parametrize('name,cls', [('cifar10', CIFAR10), ('cifar100', CIFAR100)])
def test_cifar_files_load_as_uint8_channels_first(tmp_path, no_md5, name, cls):
    root = _cifar(tmp_path, cls)
    train = build_dataset(name, 'pretrain', root, 32, download=False)
    test = build_dataset(name, 'test', root, 32, download=False)
    assert len(train) == 6 * len(cls.train_list) and len(test) == 6
    last_file = len(cls.train_list) - 1
    image, label, index = train[6 * last_file + 1]
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 32) and (label, index) == (1, 6 * last_file + 1)
    assert int(image[1, 0, 0]) == last_file  # green plane filled with its file's number: channels first, in order
    assert train.classes[:2] == ['class0', 'class1']


def test_stl10_pretrains_on_the_unlabeled_split(tmp_path, no_md5):
    folder = tmp_path / STL10.base_folder
    folder.mkdir()
    for split, n in (('unlabeled', 5), ('train', 4), ('test', 3)):
        (np.arange(n * 3 * 96 * 96) % 251).astype(np.uint8).tofile(folder / f'{split}_X.bin')
        if split != 'unlabeled':
            (np.arange(n) % 10 + 1).astype(np.uint8).tofile(folder / f'{split}_y.bin')
    (folder / 'class_names.txt').write_text('\n'.join(f'c{i}' for i in range(10)))
    pretrain = build_dataset('stl10', 'pretrain', tmp_path, 96, download=False)
    train, test = (build_dataset('stl10', s, tmp_path, 96, download=False) for s in ('train', 'test'))
    assert (len(pretrain), len(train), len(test)) == (5, 4, 3)
    image, label, _ = train[3]
    assert image.dtype == torch.uint8 and image.shape == (3, 96, 96) and label == 3


def test_missing_cifar_without_download_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r'CIFAR10 not found in .*: put torchvision\'s CIFAR10 files there'):
        build_dataset('cifar10', 'pretrain', tmp_path, 32, download=False)
