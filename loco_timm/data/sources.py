"""Image data sources through ``timm.data.create_dataset``: folders and tar files, ``torch/`` (torchvision),
``hfds/`` and ``hfids/`` (Hugging Face datasets, random access or streamed), ``wds/`` (WebDataset shards) and
``tfds/`` (TensorFlow datasets), decoded into the uint8 items the trainer and the readout take.

A dataset is named as timm names it (``hfds/imagenet-1k``, ``wds/imagenet``, ``torch/fashion_mnist``; a local
Hugging Face dataset by its folder, ``hfds//data/imagenet``), or ``imagefolder`` for a folder or tar file, with
``data_dir`` as timm's ``root``; the split of each use (``pretrain``, readout ``train``, readout ``test``) comes from
``splits`` (:data:`DEFAULT_SPLITS` otherwise). Items are ``(image, label, index)``:

* pre-training: the views' random resized crops of the *whole* image (:mod:`loco_timm.data.crops`), ``(views, 3, size,
  size)``, both from one decode; a JPEG is decoded at the smallest scale (1/1, 1/2, 1/4 or 1/8, libjpeg's DCT
  scaling through PIL's ``Image.draft``) at which no crop is upsampled;
* evaluation: the image resized so its shorter side is ``load_size`` and centre-cropped (JPEGs again drafted);
* pre-training with ``encoded`` (recipe key ``decode_device``): the JPEG bytes and the views' crop boxes (from the
  size in the file's header), decoded and cropped on the training device by :func:`decode_views`
  (``torchvision.io.decode_jpeg``, batched on CUDA); other formats are cut in the loader.

Random-access sources (folder, tar, ``torch/``, ``hfds/``) are read in the sampler's order, so a run is the same for
any number of processes and loader workers. Streams (``hfids/``, ``wds/``, ``tfds/``) are read as timm reads them:
each process and worker takes its own shards and shuffles them with the seed and the epoch; an item's crop draws
are keyed by its position in its worker's stream, so a run is the same for the same number of processes and workers
(and resumes exactly, re-reading the skipped part of the epoch), but not across other counts.
"""
from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from timm.data import create_dataset
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import v2

from ..errors import (
    DataError,
    DataNotFoundError,
    MissingDependencyError,
    UnreadableImageError,
)
from .crops import (
    ViewCropSpec,
    crop_box,
    needed_size,
    split_key,
    view_crops,
    view_uniforms,
)

__all__ = ['TIMM_PREFIXES', 'STREAM_PREFIXES', 'DEFAULT_SPLITS', 'is_timm_source', 'is_stream', 'timm_source',
           'DecodedDataset', 'StreamDataset', 'StreamLoader', 'decode', 'build_source', 'collate_encoded',
           'decode_views']

TIMM_PREFIXES = ('torch', 'hfds', 'hfids', 'wds', 'tfds')
STREAM_PREFIXES = ('hfids', 'wds', 'tfds')
DEFAULT_SPLITS = {'pretrain': 'train', 'train': 'train', 'test': 'validation'}
_PACKAGES = {'hfds': 'datasets', 'hfids': 'datasets', 'wds': 'webdataset', 'tfds': 'tensorflow-datasets'}


def _prefix(name: str) -> str:
    prefix, sep, _ = name.partition('/')
    return prefix.lower() if sep else ''


def is_timm_source(name: str) -> bool:
    """Whether ``name`` is read through timm: ``imagefolder`` or a ``torch/``, ``hfds/``, ``hfids/``, ``wds/`` or
    ``tfds/`` name."""
    return name == 'imagefolder' or (_prefix(name) in TIMM_PREFIXES and bool(name.partition('/')[2]))


def is_stream(name: str) -> bool:
    """Whether the source is read as a stream (no random access)."""
    return _prefix(name) in STREAM_PREFIXES


def timm_source(name: str, split: str, data_dir: str | os.PathLike | None, *, training: bool = False,
                download: bool = False, seed: int = 0, batch_size: int = 1, num_samples: int | None = None):
    """The timm (or torchvision) dataset of ``name``'s ``split``, without transforms.

    Raises:
        FileNotFoundError: Missing data (the message names where it was looked for). ImportError: the package the
            source needs is not installed (the message names it).
    """
    prefix = _prefix(name)
    if prefix in _PACKAGES:
        module = {'datasets': 'datasets', 'webdataset': 'webdataset', 'tensorflow-datasets': 'tensorflow_datasets'}
        package = _PACKAGES[prefix]
        try:
            __import__(module[package])
        except ImportError:
            raise MissingDependencyError(f'dataset {name!r} needs the package {package}: '
                                         f'pip install {package}') from None
    root = None if data_dir is None else str(data_dir)
    if name == 'imagefolder':
        if not root or not Path(root).exists():
            raise DataNotFoundError(f'data_dir {data_dir!r} does not exist: imagefolder needs data_dir holding '
                                    f'<split>/<class>/<images> (or <split>.tar), or a folder or tar of one split')
        tar = Path(root) / f'{split}.tar'
        root = str(tar) if tar.is_file() else root
        name = ''
    elif prefix == 'wds' and (not root or not Path(root).is_dir()):
        raise DataNotFoundError(f'data_dir {data_dir!r} is not a folder: {name} needs data_dir holding the shards '
                                f'and _info.json (timm\'s WebDataset layout)')
    kwargs: dict[str, Any] = dict(split=split, download=download)
    if prefix in STREAM_PREFIXES:
        kwargs.update(is_training=training, seed=seed, batch_size=batch_size, num_samples=num_samples)
    try:
        return create_dataset(name, root=root, **kwargs)
    except (FileNotFoundError, RuntimeError, AssertionError, ValueError, OSError) as err:
        where = f' in {data_dir}' if data_dir else ''
        raise DataNotFoundError(f'dataset {name or "imagefolder"} split {split!r} could not be read{where} '
                                f'({err.__class__.__name__}: {str(err).splitlines()[0] if str(err) else ""}): '
                                f'check the name, data_dir and the splits key') from None


def decode(sample, request: tuple[int, int] | None = None, draft: bool = True) -> torch.Tensor:
    """uint8 ``(3, H, W)`` RGB of an image given as a PIL image, bytes or a binary file. With ``draft``, a JPEG is
    decoded at the smallest of libjpeg's scales at which it is still at least ``request`` (width, height), or
    ``request`` may be a callable ``(width, height) -> (width, height)`` computing it from the full size."""
    if isinstance(sample, Image.Image):
        img = sample
    else:
        img = Image.open(io.BytesIO(sample) if isinstance(sample, (bytes, bytearray)) else sample)
        if callable(request):
            request = request(*img.size)
        if draft and request is not None and img.format == 'JPEG':
            img.draft('RGB', request)
    with img:
        return v2.functional.pil_to_tensor(img.convert('RGB'))


def _eval_crop(image: torch.Tensor, load_size: int) -> torch.Tensor:
    image = v2.functional.resize(image, load_size, antialias=True)
    return v2.functional.center_crop(image, load_size)


def _classes(source) -> list[str]:
    reader = getattr(source, 'reader', None)
    mapping = (getattr(reader, 'class_to_idx', None) or getattr(reader, 'class_name_to_idx', None)  # tar
               or getattr(source, 'class_to_idx', None))
    if mapping:
        return [str(k) for k, _ in sorted(mapping.items(), key=lambda kv: kv[1])]
    if getattr(source, 'classes', None):
        return list(source.classes)
    count = (getattr(reader, 'info', None) or {}).get('num_classes')  # WebDataset's _info.json
    return [str(i) for i in range(count)] if count else []  # else the readout counts the labels


class DecodedDataset(Dataset):
    """A random-access timm source (folder, tar, ``torch/``, ``hfds/``) decoded on the fly.

    For pre-training (``crops`` given) an item is keyed by ``epoch * KEY_STRIDE + index``. Unreadable files are not
    skipped: the error names the file (skipping would change batch sizes between processes and the contrastive loss).
    """

    channels = 3

    def __init__(self, source, load_size: int, name: str, crops: ViewCropSpec | None = None, draft: bool = True,
                 encoded: bool = False):
        self.source, self.load_size, self.name, self.crops, self.draft = source, load_size, name, crops, draft
        self.encoded = encoded and crops is not None  # pre-training items keep their JPEG bytes (decode_views)
        self.reader = getattr(source, 'reader', None)
        self.classes = _classes(source)

    def __len__(self) -> int:
        return len(self.source)

    def _name(self, index: int) -> str:
        try:
            return str(self.source.filename(index, absolute=True))
        except Exception:
            return f'item {index} of {self.name}'

    def __getitem__(self, key: int):
        epoch, index = split_key(key) if self.crops is not None else (0, int(key))
        sample, label = (self.reader if self.reader is not None else self.source)[index][:2]
        if self.encoded:
            return self._encoded(sample, index, epoch), label, index
        if self.crops is not None:
            def request(width, height):
                return needed_size(height, width, index, epoch, self.crops)
        else:
            def request(width, height):
                side = self.load_size / min(width, height)
                return math.ceil(width * side), math.ceil(height * side)
        try:
            image = decode(sample, request, self.draft)
        except Exception as err:
            raise UnreadableImageError(f'unreadable image {self._name(index)} ({err.__class__.__name__}: {err}): '
                                       f'remove or replace the file, then run again') from None
        finally:
            if hasattr(sample, 'close'):
                sample.close()
        if self.crops is not None:
            return view_crops(image, index, epoch, self.crops), label, index
        return _eval_crop(image, self.load_size), label, index


    def _encoded(self, sample, index: int, epoch: int):
        """``(JPEG bytes as a uint8 tensor, crop boxes (views, 4))``, the boxes from the size in the file's header;
        an image of another format is decoded and cropped here, ``(views, 3, size, size)``."""
        if not isinstance(sample, Image.Image):
            data = sample if isinstance(sample, (bytes, bytearray)) else sample.read()
            if hasattr(sample, 'close'):
                sample.close()
            if data[:2] == b'\xff\xd8':
                with Image.open(io.BytesIO(data)) as img:
                    width, height = img.size
                u = view_uniforms(index, epoch, self.crops)
                boxes = torch.tensor([crop_box(height, width, u[v], self.crops) for v in range(self.crops.views)])
                return torch.frombuffer(bytearray(data), dtype=torch.uint8), boxes
            sample = data
        return view_crops(decode(sample, draft=False), index, epoch, self.crops), torch.zeros(0, 4, dtype=torch.long)


def collate_encoded(items: list) -> tuple:
    """Batch of :class:`DecodedDataset` items with ``encoded=True``: ``((payloads, boxes), labels, indices)``, the
    payloads a list (JPEG bytes, or crops already cut)."""
    payloads = [item[0][0] for item in items]
    boxes = [item[0][1] for item in items]
    return (payloads, boxes), torch.tensor([int(item[1]) for item in items]), torch.tensor([item[2] for item in items])


def decode_views(payloads: list[torch.Tensor], boxes: list[torch.Tensor], size: int,
                 device: torch.device | str) -> torch.Tensor:
    """uint8 ``(N, views, 3, size, size)`` on ``device``: the JPEGs decoded there (``torchvision.io.decode_jpeg``,
    batched on CUDA) and each view's crop resized with antialiasing; crops cut in the loader are moved as they are."""
    device = torch.device(device)
    jpegs = [i for i, p in enumerate(payloads) if p.ndim == 1]
    decoded = dict(zip(jpegs, decode_jpeg([payloads[i] for i in jpegs], device=device, mode=ImageReadMode.RGB)
                       if jpegs else []))
    out = []
    for i, payload in enumerate(payloads):
        if i not in decoded:
            out.append(payload.to(device))
            continue
        image = decoded[i]
        out.append(torch.stack([v2.functional.resized_crop(image, *map(int, box), size=[size, size], antialias=True)
                                for box in boxes[i]]))
    return torch.stack(out)


class StreamDataset(IterableDataset):
    """A streamed timm source (``hfids/``, ``wds/``, ``tfds/``) decoded on the fly, each process and loader worker
    reading its own shards (timm's readers split them by ``torch.distributed`` rank and worker).

    Items are ``(image, label, index)`` with ``index = position * workers + worker`` over all processes' workers, so
    the crop draws depend on the seed, the epoch and the item's place in the stream. :meth:`set_epoch` reshuffles.
    """

    channels = 3

    def __init__(self, source, load_size: int, name: str, crops: ViewCropSpec | None = None, num_samples: int = 0):
        self.source, self.load_size, self.name, self.crops = source, load_size, name, crops
        self.classes = _classes(source)
        self.num_samples, self.epoch = num_samples, 0

    def __len__(self) -> int:
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.source.set_epoch(epoch)

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        rank, world = 0, 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        reader = getattr(self.source, 'reader', None)
        if info is None and reader is not None and hasattr(reader, 'ds'):
            reader.ds = None  # in the main process: a fresh pipeline (and shuffle) per epoch, as in a new worker
        offset, stride = rank * workers + worker, world * workers
        for position, (sample, label) in enumerate(self.source):
            index = position * stride + offset
            image = decode(sample)
            if self.crops is not None:
                yield view_crops(image, index, self.epoch, self.crops), label, index
            else:
                yield _eval_crop(image, self.load_size), label, index


def build_source(name: str, split: str, data_dir, image_size: int, subset: int | None = None, *,
                 crops: ViewCropSpec | None = None, splits: dict | None = None, download: bool = False,
                 seed: int = 0, batch_size: int = 1, draft: bool = True, encoded: bool = False) -> Dataset:
    """The decoded dataset of a timm source for one use (``pretrain``, ``train`` or ``test``); see the module."""
    timm_split = dict(DEFAULT_SPLITS, **(splits or {}))[split]
    load_size = max(image_size * 8 // 7, image_size)
    crops = crops if split == 'pretrain' else None
    if is_stream(name):
        source = timm_source(name, timm_split, data_dir, training=split == 'pretrain', download=download,
                             seed=seed, batch_size=batch_size, num_samples=subset)
        total = subset or getattr(source.reader, 'num_samples', 0) or 0
        if not total:
            raise DataNotFoundError(f'dataset {name} split {timm_split!r} does not say how many images it has: '
                                    f'set subset (or num_samples in its info file)')
        return StreamDataset(source, load_size, name, crops, num_samples=total)
    source = timm_source(name, timm_split, data_dir, download=download)
    return DecodedDataset(source, load_size, name, crops, draft, encoded)


class StreamLoader:
    """Per-process batches of a streamed source: a new loader per epoch whose workers' shuffles are seeded by
    ``(seed, epoch, process)``, so an epoch's stream is the same in a resumed run; a mid-epoch resume reads and drops
    the epoch's first ``skip`` batches. Yields exactly ``steps`` batches per epoch, on ``device``."""

    def __init__(self, dataset, batch_size: int, num_workers: int, pin: bool, seed: int, rank: int, device):
        self.dataset, self.batch_size, self.num_workers, self.pin = dataset, batch_size, num_workers, pin
        self.seed, self.rank, self.device = seed, rank, device
        dataset.source.set_loader_cfg(num_workers=num_workers)

    def epoch(self, epoch: int, skip: int, steps: int):
        self.dataset.set_epoch(epoch)
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 1009 + self.rank)
        loader = DataLoader(self.dataset, batch_size=self.batch_size, num_workers=self.num_workers,
                            pin_memory=self.pin, drop_last=True, generator=generator)
        count = 0
        for count, batch in enumerate(loader, 1):
            if count > skip:
                yield [t.to(self.device, non_blocking=self.pin) for t in batch]
            if count == steps:
                return
        raise DataError(f'the stream of {self.dataset.name} gave {count} batches of {self.batch_size} in epoch '
                          f'{epoch}, fewer than the {steps} an epoch needs: give its info file the right '
                          f'num_samples, or set subset')
