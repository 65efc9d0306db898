"""Small real datasets in every format timm reads, made from the same JPEGs: an image folder, a tar per split, a
Hugging Face dataset (parquet files, the Hub's layout), WebDataset shards with timm's ``_info.json``."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np

CLASSES = ('cat', 'dog', 'fox')
SPLITS = {'train': 18, 'validation': 9}


def images(split: str, count: int, seed: int = 0) -> list[tuple[bytes, int, str]]:
    """``(JPEG bytes, label, file name)`` of non-square images (40-90 px a side), class = index mod 3; each class
    has its own mean colour, so a readout can learn it."""
    from PIL import Image
    rng = np.random.default_rng(seed + (split == 'validation'))
    out = []
    for i in range(count):
        label = i % len(CLASSES)
        h, w = int(rng.integers(40, 90)), int(rng.integers(40, 90))
        base = np.zeros(3)
        base[label] = 200
        pixels = np.clip(base + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format='JPEG', quality=90)
        out.append((buf.getvalue(), label, f'{split}_{i:04d}'))
    return out


def image_folder(root: Path) -> Path:
    """``root/<split>/<class>/<name>.jpg``."""
    for split, count in SPLITS.items():
        for data, label, name in images(split, count):
            path = root / split / CLASSES[label] / f'{name}.jpg'
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    return root


def tar_splits(root: Path) -> Path:
    """``root/<split>.tar`` holding ``<class>/<name>.jpg``."""
    root.mkdir(parents=True, exist_ok=True)
    for split, count in SPLITS.items():
        with tarfile.open(root / f'{split}.tar', 'w') as tar:
            for data, label, name in images(split, count):
                info = tarfile.TarInfo(f'{CLASSES[label]}/{name}.jpg')
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return root


def hf_parquet(root: Path) -> Path:
    """A Hugging Face dataset with ``image`` and ``label`` (ClassLabel) columns, as parquet files per split."""
    import datasets
    features = datasets.Features({'image': datasets.Image(), 'label': datasets.ClassLabel(names=list(CLASSES))})
    root.mkdir(parents=True, exist_ok=True)
    for split, count in SPLITS.items():
        items = images(split, count)
        ds = datasets.Dataset.from_dict({'image': [{'bytes': d, 'path': None} for d, _, _ in items],
                                         'label': [label for _, label, _ in items]}, features=features)
        (root / 'data').mkdir(exist_ok=True)
        ds.to_parquet(str(root / 'data' / f'{split}-00000-of-00001.parquet'))
    return root


def wds_shards(root: Path, per_shard: int = 6) -> Path:
    """WebDataset shards ``<split>-NNNN.tar`` (``.jpg`` + ``.cls`` per sample) and timm's ``_info.json``."""
    root.mkdir(parents=True, exist_ok=True)
    info = {'name': 'tiny', 'num_classes': len(CLASSES), 'splits': {}}
    for split, count in SPLITS.items():
        items, files, lengths = images(split, count), [], []
        for shard, start in enumerate(range(0, count, per_shard)):
            name = f'{split}-{shard:04d}.tar'
            chunk = items[start:start + per_shard]
            with tarfile.open(root / name, 'w') as tar:
                for data, label, key in chunk:
                    for ext, payload in (('jpg', data), ('cls', str(label).encode())):
                        member = tarfile.TarInfo(f'{key}.{ext}')
                        member.size = len(payload)
                        tar.addfile(member, io.BytesIO(payload))
            files.append(name)
            lengths.append(len(chunk))
        info['splits'][split] = {'name': split, 'num_samples': count, 'filenames': files, 'shard_lengths': lengths}
    (root / '_info.json').write_text(json.dumps(info))
    return root
