"""Datasets: Fashion-MNIST is the embedded default.

Fashion-MNIST is looked up, in order, in ``data_dir``, ``$LOCO_TIMM_DATA``, and where Debian's package
``dataset-fashion-mnist`` installs it (``/usr/share/datasets/fashion-mnist``). Its IDX files (``.gz`` or not) are
unpacked once into a cache folder laid out as torchvision expects and then read with
``torchvision.datasets.FashionMNIST``. Without local files, torchvision's downloader is used where a network
exists; otherwise a clear error says how to get the files.
"""
from __future__ import annotations

import gzip
import os
import shutil
import tempfile
from pathlib import Path

__all__ = ['FASHION_MNIST_FILES', 'DEBIAN_FASHION_MNIST', 'find_fashion_mnist', 'fashion_mnist', 'cache_dir']

FASHION_MNIST_FILES = ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte',
                       't10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte')
DEBIAN_FASHION_MNIST = Path('/usr/share/datasets/fashion-mnist')
ENV_DATA = 'LOCO_TIMM_DATA'


def cache_dir() -> Path:
    """Where unpacked datasets are kept: ``$LOCO_TIMM_CACHE`` or ``~/.cache/loco_timm``."""
    return Path(os.environ.get('LOCO_TIMM_CACHE', Path.home() / '.cache' / 'loco_timm'))


def _has_idx_files(folder: Path) -> bool:
    return all((folder / f).is_file() or (folder / f'{f}.gz').is_file() for f in FASHION_MNIST_FILES)


def find_fashion_mnist(data_dir: str | os.PathLike | None = None) -> Path | None:
    """The first folder holding the four Fashion-MNIST IDX files, or None.

    Looks in ``data_dir`` (and its ``FashionMNIST/raw`` sub-folder, torchvision's layout), ``$LOCO_TIMM_DATA``
    and Debian's ``/usr/share/datasets/fashion-mnist``.
    """
    candidates = [data_dir, os.environ.get(ENV_DATA), DEBIAN_FASHION_MNIST]
    for base in candidates:
        if not base:
            continue
        for folder in (Path(base), Path(base) / 'FashionMNIST' / 'raw', Path(base) / 'fashion-mnist'):
            if _has_idx_files(folder):
                return folder
    return None


def _unpack(source: Path, root: Path) -> None:
    """Unpack the IDX files into ``root/FashionMNIST/raw`` (each file written atomically)."""
    raw = root / 'FashionMNIST' / 'raw'
    raw.mkdir(parents=True, exist_ok=True)
    for name in FASHION_MNIST_FILES:
        target = raw / name
        if target.is_file():
            continue
        plain, packed = source / name, source / f'{name}.gz'
        fd, tmp = tempfile.mkstemp(dir=raw, prefix=f'.{name}.')
        with os.fdopen(fd, 'wb') as out, (open(plain, 'rb') if plain.is_file() else gzip.open(packed, 'rb')) as src:
            shutil.copyfileobj(src, out)
        os.replace(tmp, target)


def fashion_mnist(train: bool = True, data_dir: str | os.PathLike | None = None, download: bool = True):
    """Fashion-MNIST as a ``torchvision.datasets.FashionMNIST`` (PIL images, integer labels).

    Args:
        train: The 60k training split (else the 10k test split).
        data_dir: A folder holding the IDX files; see :func:`find_fashion_mnist` for the other places looked at.
        download: Use torchvision's downloader when no local files are found.

    Raises:
        FileNotFoundError: If the files are nowhere to be found and cannot be downloaded.
    """
    from torchvision.datasets import FashionMNIST
    source = find_fashion_mnist(data_dir)
    root = cache_dir() / 'data'
    if source is not None:
        _unpack(source, root)
        return FashionMNIST(str(root), train=train, download=False)
    if download:
        try:
            return FashionMNIST(str(root), train=train, download=True)
        except Exception as err:  # no network: fall through to the error below
            reason = f' (download failed: {err.__class__.__name__})'
    else:
        reason = ''
    raise FileNotFoundError(
        f'Fashion-MNIST not found in {data_dir or "--data-dir"}, ${ENV_DATA} or {DEBIAN_FASHION_MNIST}{reason}: '
        f'install it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu) or put the four IDX files '
        f'({", ".join(FASHION_MNIST_FILES)}, optionally .gz) in a folder and pass it as data_dir')
