"""Datasets: Fashion-MNIST (the embedded default), CIFAR-10/100 and STL-10 as uint8 image tensors, and every source
timm reads (:mod:`loco_timm.data.sources`).

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

import torch
from torch.utils.data import Dataset, Sampler
from torchvision.datasets import CIFAR10, CIFAR100, STL10, FashionMNIST

from ..errors import ConfigError, DataNotFoundError
from ..files import plain_permissions
from .crops import KEY_STRIDE, ViewCropSpec
from .sources import build_source, is_stream, is_timm_source

__all__ = ['FASHION_MNIST_FILES', 'DEBIAN_FASHION_MNIST', 'find_fashion_mnist', 'fashion_mnist', 'cache_dir',
           'DATASETS', 'NORMALIZATION', 'normalization', 'build_dataset', 'ImageTensorDataset', 'EpochSampler',
           'ShareSampler']

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
        plain_permissions(tmp)  # mkstemp creates 0600
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
    raise DataNotFoundError(
        f'Fashion-MNIST not found in {data_dir or "--data-dir"}, ${ENV_DATA} or {DEBIAN_FASHION_MNIST}{reason}: '
        f'install it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu) or put the four IDX files '
        f'({", ".join(FASHION_MNIST_FILES)}, optionally .gz) in a folder and pass it as data_dir')


# ----------------------------------------------------------------------------------------------------------------
# Datasets as uint8 image tensors: augmentation runs batched on the device (loco_timm.data.augment)

NORMALIZATION = {
    'fashion_mnist': ((0.2860,), (0.3530,)),
    'cifar10': ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    'cifar100': ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    'stl10': ((0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)),
    'imagefolder': ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
DATASETS = tuple(NORMALIZATION)  # the named datasets; timm sources come by their prefixed names
SPLITS = ('pretrain', 'train', 'test')


class ImageTensorDataset(Dataset):
    """Images held in memory as a uint8 (N, C, H, W) tensor; items are ``(image, label, index)``."""

    crops = None  # augmented whole, batched on the device

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: list[str], name: str):
        self.images, self.labels, self.classes, self.name = images, labels, list(classes), name

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.images[index], self.labels[index], index

    @property
    def channels(self) -> int:
        return self.images.shape[1]


def _torchvision_dataset(cls, root: Path, download: bool, **kwargs):
    fix = f'put torchvision\'s {cls.__name__} files there (as its downloader lays them out) and pass it as data_dir'
    try:
        return cls(str(root), download=False, **kwargs)
    except RuntimeError:
        if not download:
            raise DataNotFoundError(f'{cls.__name__} not found in {root} (downloading is off): {fix}') from None
    try:
        return cls(str(root), download=True, **kwargs)
    except Exception as err:
        raise DataNotFoundError(
            f'{cls.__name__} not found in {root} and could not be downloaded ({err.__class__.__name__}): {fix}') \
            from None


def normalization(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of a dataset (ImageNet's for the sources read through timm)."""
    return NORMALIZATION.get(name, NORMALIZATION['imagefolder'])


def build_dataset(name: str, split: str = 'pretrain', data_dir: str | os.PathLike | None = None,
                  image_size: int = 224, subset: int | None = None, *, download: bool = True,
                  crops: ViewCropSpec | None = None, splits: dict | None = None, seed: int = 0,
                  batch_size: int = 1, draft: bool = True, encoded: bool = False) -> Dataset:
    """A dataset of ``(uint8 image (C, H, W), label, index)`` items.

    Args:
        name: ``fashion_mnist``, ``cifar10``, ``cifar100``, ``stl10``, or a source read through timm
            (``imagefolder``, ``torch/...``, ``hfds/...``, ``hfids/...``, ``wds/...``, ``tfds/...``;
            :mod:`loco_timm.data.sources`).
        split: ``pretrain`` (STL-10: the unlabeled split; else the training split), ``train`` or ``test``
            (timm sources: the split ``splits`` names for it, by default train, train and validation).
        data_dir: Where the files are (required for imagefolder and wds; timm's ``root`` for the others).
        image_size: Training crop size; timm sources are loaded at 8/7 of it for evaluation.
        subset: Keep only the first ``subset`` items (streams: ``subset`` items per epoch).
        download: Use torchvision's downloader when files are missing (where a network exists).
        crops: timm sources' pre-training: cut the views' random resized crops from the whole image in the loader
            (items keyed by :class:`EpochSampler` with ``keys=True``); ignored by the in-memory datasets, which
            crop batched on the device.
        splits: timm sources: the split name of each use (``pretrain``, ``train``, ``test``).
        seed, batch_size: Streams: the shuffle seed and the per-process batch size (timm's readers round each
            worker's share of an epoch up to whole batches).
        draft: Decode JPEGs of timm sources at a reduced scale where no crop needs the full resolution.
        encoded: Random-access timm sources' pre-training: items keep the JPEG bytes and crop boxes, for
            :func:`loco_timm.data.sources.decode_views` on the training device.

    Raises:
        ConfigError: Unknown name or split. DataNotFoundError: missing or empty data.
    """
    if split not in SPLITS:
        raise ConfigError(f'unknown split {split!r}: use one of {", ".join(SPLITS)}')
    if is_timm_source(name):
        ds = build_source(name, split, data_dir, image_size, subset, crops=crops, splits=splits, download=download,
                          seed=seed, batch_size=batch_size, draft=draft, encoded=encoded)
        if is_stream(name):
            return ds
    else:
        ds = _in_memory(name, split, data_dir, download)
    if len(ds) == 0:
        raise DataNotFoundError(f'dataset {name} ({split}) in {data_dir} is empty: add images, then run again')
    return _Subset(ds, subset) if subset is not None and subset < len(ds) else ds


def _in_memory(name: str, split: str, data_dir: str | os.PathLike | None, download: bool) -> ImageTensorDataset:
    """Fashion-MNIST, CIFAR and STL-10 as uint8 tensors in memory."""
    train = split != 'test'
    if name == 'fashion_mnist':
        base = fashion_mnist(train=train, data_dir=data_dir, download=download)
        ds = ImageTensorDataset(base.data.unsqueeze(1), base.targets, base.classes, name)
    elif name in ('cifar10', 'cifar100'):
        root = Path(data_dir or cache_dir() / 'data')
        base = _torchvision_dataset(CIFAR10 if name == 'cifar10' else CIFAR100, root, download, train=train)
        ds = ImageTensorDataset(torch.from_numpy(base.data).permute(0, 3, 1, 2).contiguous(),
                                torch.tensor(base.targets), base.classes, name)
    elif name == 'stl10':
        root = Path(data_dir or cache_dir() / 'data')
        stl_split = {'pretrain': 'unlabeled', 'train': 'train', 'test': 'test'}[split]
        base = _torchvision_dataset(STL10, root, download, split=stl_split)
        ds = ImageTensorDataset(torch.from_numpy(base.data), torch.from_numpy(base.labels).long(), base.classes, name)
    else:
        raise ConfigError(f'unknown dataset {name!r}: use one of {", ".join(NORMALIZATION)} or a timm dataset name '
                          f'(torch/, hfds/, hfids/, wds/, tfds/)')
    return ds


class _Subset(Dataset):
    """The first ``n`` items of a dataset (keeps ``classes``, ``channels`` and ``name``)."""

    def __init__(self, base: Dataset, n: int):
        self.base, self.n = base, n
        self.classes, self.channels, self.name = base.classes, base.channels, base.name
        self.crops = getattr(base, 'crops', None)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        return self.base[index]


class EpochSampler(Sampler[int]):
    """A permutation of the dataset that depends only on ``(seed, epoch)``: the same on every process and resume.
    With ``keys=True`` it yields ``epoch * KEY_STRIDE + index`` (for datasets that crop in the loader)."""

    def __init__(self, size: int, seed: int = 0, shuffle: bool = True, keys: bool = False):
        self.size, self.seed, self.shuffle, self.epoch, self.keys = size, seed, shuffle, 0, keys

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        order = range(self.size) if not self.shuffle else torch.randperm(
            self.size, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)).tolist()
        offset = self.epoch * KEY_STRIDE if self.keys else 0
        return iter([offset + i for i in order])

    def __len__(self) -> int:
        return self.size


class ShareSampler(Sampler[list]):
    """Batch sampler of one replica: share ``part`` of ``parts`` of every global batch of ``sampler``'s order (under
    stage parallelism only the first stage group's process of each replica loads images). ``set_epoch(epoch,
    start)`` starts the epoch at global batch ``start`` (a mid-epoch resume) without loading the batches before."""

    def __init__(self, sampler: EpochSampler, batch_size: int, part: int = 0, parts: int = 1):
        self.sampler, self.batch_size, self.part, self.parts, self.start = sampler, batch_size, part, parts, 0
        self.share = batch_size // parts

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.sampler.set_epoch(epoch)
        self.start = start

    def __iter__(self):
        order = list(self.sampler)
        for i in range(self.start, len(order) // self.batch_size):
            first = i * self.batch_size + self.part * self.share
            yield order[first:first + self.share]

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size - self.start
