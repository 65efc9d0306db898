"""ImageFolder data: decoding to fixed-size uint8 tensors, and unreadable files named in the error."""
import pytest
import torch
from PIL import Image

from loco_timm.data.datasets import build_dataset


def _folder(root, sizes=((40, 30), (20, 50))):
    for i, size in enumerate(sizes):
        d = root / 'train' / f'class{i}'
        d.mkdir(parents=True)
        Image.new('RGB', size, (i * 100, 50, 200)).save(d / f'img{i}.png')
    return root


def test_imagefolder_items_are_square_uint8_at_the_load_size(tmp_path):
    ds = build_dataset('imagefolder', 'train', _folder(tmp_path), image_size=28)
    image, label, index = ds[1]
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 32) and (label, index) == (1, 1)
    assert ds.classes == ['class0', 'class1']


def test_unreadable_image_fails_naming_the_file(tmp_path):
    root = _folder(tmp_path)
    bad = root / 'train' / 'class0' / 'broken.jpg'
    bad.write_bytes(b'not an image')
    ds = build_dataset('imagefolder', 'train', root, image_size=28)
    index = [p for p, _ in ds.reader.samples].index(str(bad))
    with pytest.raises(RuntimeError, match=f'unreadable image {bad} .*remove or replace the file'):
        ds[index]
