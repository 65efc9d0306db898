"""SimCLR's random resized crop cut from the whole decoded image in the loader (ImageFolder pre-training)."""

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from loco_timm.data.augment import NUM_UNIFORMS, SimCLRAugment, sample_uniforms
from loco_timm.data.crops import KEY_STRIDE, ViewCropSpec, crop_box, split_key, view_crops
from loco_timm.data.datasets import EpochSampler, build_dataset

SPEC = ViewCropSpec(size=32, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), seed=3)


def test_crops_cover_the_whole_non_square_image_with_the_recipes_scale_and_aspect_ratio():
    height, width = 100, 300  # the centre square is columns 100-199
    boxes = [crop_box(height, width, sample_uniforms(torch.tensor([7]), SPEC.seed, epoch, view, NUM_UNIFORMS)[0],
                      SPEC) for epoch in range(400) for view in (0, 1)]
    lefts = [left for _, left, _, _ in boxes]
    rights = [left + w for _, left, _, w in boxes]
    assert min(lefts) < 20 and max(rights) > 280  # far outside the centre square on both sides
    outside = sum(left < 100 or left + w > 200 for _, left, _, w in boxes)
    assert outside > 0.5 * len(boxes)
    free = [(h, w) for _, _, h, w in boxes if h < height and w < width]  # not clamped to the image
    assert len(free) > 100
    for h, w in free:  # area and pixel aspect ratio of the recipe, up to rounding to whole pixels
        assert SPEC.scale[0] - 0.01 <= h * w / (height * width) <= SPEC.scale[1] + 0.01
        assert 3 / 4 - 0.05 <= w / h <= 4 / 3 + 0.05
    areas = sorted(h * w / (height * width) for h, w in free)
    assert areas[0] < 0.1 and areas[-1] > 0.3  # the range is used (larger crops of a 3:1 image are clamped)


def test_view_crops_depend_only_on_seed_epoch_index_and_view():
    image = torch.randint(0, 256, (3, 90, 160), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    a, b = view_crops(image, 5, 2, SPEC), view_crops(image, 5, 2, SPEC)
    assert a.shape == (2, 3, 32, 32) and a.dtype == torch.uint8 and torch.equal(a, b)
    assert not torch.equal(a[0], a[1]) and not torch.equal(a, view_crops(image, 5, 3, SPEC))
    assert split_key(3 * KEY_STRIDE + 11) == (3, 11)


def test_a_cropped_view_gets_only_the_flip_on_the_device():
    aug = SimCLRAugment(32, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, mean=(0.0,), std=(1.0,))
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    index = torch.arange(16)
    out = aug(images, index, 0, 0, 1, cropped=True)
    flips = sample_uniforms(index, 0, 0, 1, NUM_UNIFORMS)[:, 4] < 0.5
    expected = torch.where(flips.view(-1, 1, 1, 1), images.flip(-1), images).float() / 255
    torch.testing.assert_close(out, expected)
    assert 0 < int(flips.sum()) < 16
    with pytest.raises(ValueError, match='cropped views must be 32x32'):
        aug(images[:, :, :20], index, 0, 0, 1, cropped=True)


def _folder(root):
    for c, (w, h) in enumerate(((120, 60), (50, 110))):
        folder = root / 'train' / f'class{c}'
        folder.mkdir(parents=True)
        for i in range(6):
            Image.new('RGB', (w + i, h), (40 * i, 100 + 20 * c, 30)).save(folder / f'{i}.png')
    return root


@pytest.mark.parametrize('workers', [0, 2])
def test_the_loader_gives_the_same_views_for_any_number_of_workers(tmp_path, workers):
    data = _folder(tmp_path)
    spec = ViewCropSpec(24, (0.2, 1.0), seed=1)
    dataset = build_dataset('imagefolder', 'pretrain', data, 24, crops=spec)
    sampler = EpochSampler(len(dataset), seed=1, keys=True)
    sampler.set_epoch(2)
    loader = DataLoader(dataset, batch_size=4, sampler=sampler, num_workers=workers)
    batches = list(loader)
    images, _, index = batches[0]
    assert images.shape == (4, 2, 3, 24, 24)
    for view, image in zip(images, index.tolist()):
        path = dataset.reader.samples[image][0]
        full = torch.from_numpy(np.array(Image.open(path).convert('RGB'))).permute(2, 0, 1)
        assert torch.equal(view, view_crops(full.contiguous(), image, 2, spec))
    plain = build_dataset('imagefolder', 'train', data, 24)  # readout and evaluation: resize and centre crop
    assert plain.crops is None and plain[0][0].shape == (3, 27, 27)
