"""Batched SimCLR augmentation: batching-independent determinism, shapes and each operation in isolation."""
import pytest
import torch

from loco_timm.data.augment import NUM_UNIFORMS, SimCLRAugment, sample_uniforms

IDENTITY = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, grayscale_p=0.0)
RAW = dict(mean=(0.0,), std=(1.0,))


def images(n=8, channels=3, size=28, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, channels, size, size), generator=g, dtype=torch.uint8)


@pytest.mark.parametrize('channels', [1, 3])
def test_same_key_same_output_whatever_the_batch(channels):
    aug = SimCLRAugment(32, blur_min_size=16)  # exercise every op, blur included
    x, idx = images(channels=channels), torch.arange(100, 108)
    full = aug(x, idx, seed=7, epoch=3, view=1)
    pick = torch.tensor([5, 0, 3])
    sub = aug(x[pick], idx[pick], seed=7, epoch=3, view=1)
    torch.testing.assert_close(sub, full[pick], rtol=0, atol=1e-5)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(aug(x[perm], idx[perm], 7, 3, 1), full[perm], rtol=0, atol=1e-5)
    for other in [dict(seed=8, epoch=3, view=1), dict(seed=7, epoch=4, view=1), dict(seed=7, epoch=3, view=0)]:
        different = aug(x, idx, **other)
        assert all(not torch.allclose(different[i], full[i]) for i in range(8)), other


@pytest.mark.parametrize('channels,size', [(1, 28), (3, 28), (1, 32), (3, 32), (3, 20)])
def test_shape_dtype_device(channels, size):
    out = SimCLRAugment(size)(images(channels=channels), torch.arange(8), 0, 0, 0)
    assert out.shape == (8, channels, size, size) and out.dtype == torch.float32 and out.device.type == 'cpu'
    assert torch.isfinite(out).all()
    plain = SimCLRAugment(size).plain(images(channels=channels))
    assert plain.shape == (8, channels, size, size) and plain.dtype == torch.float32


@pytest.mark.parametrize('channels', [1, 3])
def test_identity_crop_equals_plain(channels):
    aug = SimCLRAugment(28, **IDENTITY, mean=(0.2, 0.4, 0.6)[:channels], std=(0.3, 0.5, 0.7)[:channels])
    x = images(channels=channels)
    torch.testing.assert_close(aug(x, torch.arange(8), 1, 2, 3), aug.plain(x), rtol=0, atol=1e-5)


def test_flip_with_identity_crop():
    aug = SimCLRAugment(28, **{**IDENTITY, 'flip_p': 1.0})
    x = images()
    torch.testing.assert_close(aug(x, torch.arange(8), 0, 0, 0), aug.plain(x).flip(-1), rtol=0, atol=1e-5)


def test_grayscale_gives_equal_channels():
    aug = SimCLRAugment(32, grayscale_p=1.0, **RAW)
    out = aug(images(), torch.arange(8), 0, 0, 0)
    torch.testing.assert_close(out[:, 0], out[:, 1], rtol=0, atol=1e-6)
    torch.testing.assert_close(out[:, 0], out[:, 2], rtol=0, atol=1e-6)
    # and the identity-crop grayscale is the ITU-R 601 luma
    x = images()
    gray = SimCLRAugment(28, **{**IDENTITY, 'grayscale_p': 1.0}, **RAW)(x, torch.arange(8), 0, 0, 0)
    luma = (torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1) * x.float() / 255).sum(1)
    torch.testing.assert_close(gray[:, 1], luma, rtol=0, atol=1e-5)


@pytest.mark.parametrize('channels', [1, 3])
def test_brightness_only_scales_each_image(channels):
    aug = SimCLRAugment(28, **{**IDENTITY, 'jitter': (0.4, 0.0, 0.0, 0.0), 'jitter_p': 1.0}, **RAW)
    x = images(channels=channels)
    out, plain = aug(x, torch.arange(8), 0, 0, 0), aug.plain(x)
    factors = []
    for o, p in zip(out, plain):
        keep = (o < 1 - 1e-6) & (p > 0.05)
        ratio = o[keep] / p[keep]
        assert keep.sum() > 100
        assert ratio.max() - ratio.min() < 1e-4
        assert 0.6 <= ratio.mean() <= 1.4
        factors.append(ratio.mean().item())
    assert max(factors) - min(factors) > 1e-3  # per-sample factors


def test_full_colour_jitter_stays_in_range_and_changes_colour():
    aug = SimCLRAugment(28, **{**IDENTITY, 'jitter_p': 1.0}, **RAW)
    x = images()
    out = aug(x, torch.arange(8), 0, 0, 0)
    assert out.min() >= 0 and out.max() <= 1
    assert not torch.allclose(out, aug.plain(x), atol=1e-3)


def test_blur_only_from_blur_min_size():
    x, idx = images(size=32), torch.arange(8)
    no_blur = SimCLRAugment(32, **IDENTITY, blur_p=1.0, blur_min_size=64)
    blur = SimCLRAugment(32, **IDENTITY, blur_p=1.0, blur_min_size=16)
    torch.testing.assert_close(no_blur(x, idx, 0, 0, 0), no_blur.plain(x), rtol=0, atol=1e-5)
    blurred = blur(x, idx, 0, 0, 0)
    assert all(not torch.allclose(blurred[i], blur.plain(x)[i], atol=1e-3) for i in range(8))
    # a blur keeps a constant image constant (normalised kernel, reflect padding)
    flat = torch.full((2, 3, 32, 32), 77, dtype=torch.uint8)
    torch.testing.assert_close(blur(flat, idx[:2], 0, 0, 0), blur.plain(flat), rtol=0, atol=1e-5)


def test_sample_uniforms_range_and_determinism():
    idx = torch.tensor([0, 1, 2, 5, 10**12, -3])
    u = sample_uniforms(idx, 1, 2, 0, NUM_UNIFORMS)
    assert u.shape == (6, NUM_UNIFORMS) and u.dtype == torch.float64
    assert (u >= 0).all() and (u < 1).all()
    assert torch.equal(u, sample_uniforms(idx, 1, 2, 0, NUM_UNIFORMS))
    assert torch.equal(u[3:4], sample_uniforms(idx[3:4], 1, 2, 0, NUM_UNIFORMS))
    assert len({tuple(row.tolist()) for row in u}) == 6
    assert not torch.equal(u, sample_uniforms(idx, 1, 2, 1, NUM_UNIFORMS))
    assert not torch.equal(u, sample_uniforms(idx, 1, 3, 0, NUM_UNIFORMS))
    assert not torch.equal(u, sample_uniforms(idx, 2, 2, 0, NUM_UNIFORMS))
