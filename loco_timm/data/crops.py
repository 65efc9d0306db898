"""SimCLR's random resized crop on the whole decoded image, in the loader.

Images of a folder differ in size, so they cannot be batched before cropping. Centre-cropping them to a square first (as
the loader once did) would keep every crop out of the parts of a non-square image outside that square; SimCLR and the
paper crop 8-100 % of the *whole* image at aspect 3/4-4/3. Here each image is decoded once and both views are cut from
it with the draws of :func:`loco_timm.data.augment.sample_uniforms` for ``(seed, epoch, index, view)`` (the slots
:class:`~loco_timm.data.augment.SimCLRAugment` uses for its own crop) and resized to the training size with
antialiasing; the flip, colour and blur steps stay batched on the device. Runs stay identical for any number of
processes and workers.

The sampler passes the epoch to the dataset inside each key (``epoch * KEY_STRIDE + index``), so worker
processes, persistent or not, need no shared state.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torchvision.transforms import v2

from .augment import NUM_UNIFORMS, crop_fractions, sample_uniforms

__all__ = ['KEY_STRIDE', 'ViewCropSpec', 'crop_box', 'view_crops', 'split_key', 'view_uniforms', 'needed_size']

KEY_STRIDE = 1 << 40


def split_key(key: int) -> tuple[int, int]:
    """``(epoch, index)`` of a sampler key."""
    return divmod(int(key), KEY_STRIDE)


@dataclass(frozen=True)
class ViewCropSpec:
    """What the loader's crops need: output size, area range, aspect-ratio range, run seed, number of views."""
    size: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    seed: int = 0
    views: int = 2


def crop_box(height: int, width: int, u: torch.Tensor, spec: ViewCropSpec) -> tuple[int, int, int, int]:
    """``(top, left, crop height, crop width)`` in pixels of the crop drawn by uniforms ``u`` ``(NUM_UNIFORMS,)``."""
    w, h, cx, cy = (v.item() for v in crop_fractions(u.view(1, -1), height, width, spec.scale,
                                                     (math.log(spec.ratio[0]), math.log(spec.ratio[1]))))
    crop_w, crop_h = max(1, round(w * width)), max(1, round(h * height))
    left = min(max(round((cx + 1) / 2 * width - crop_w / 2), 0), width - crop_w)
    top = min(max(round((cy + 1) / 2 * height - crop_h / 2), 0), height - crop_h)
    return top, left, crop_h, crop_w


def view_uniforms(index: int, epoch: int, spec: ViewCropSpec) -> torch.Tensor:
    """``(views, NUM_UNIFORMS)``: the draws of an item's views."""
    return torch.cat([sample_uniforms(torch.tensor([index]), spec.seed, epoch, view, NUM_UNIFORMS)
                      for view in range(spec.views)])


def needed_size(height: int, width: int, index: int, epoch: int, spec: ViewCropSpec) -> tuple[int, int]:
    """``(width, height)`` the image must have so that no view's crop is upsampled: a JPEG decoder may scale the
    image down to it while decoding (PIL's ``Image.draft``), since every crop is then still at least ``size``
    pixels wide and high."""
    u = view_uniforms(index, epoch, spec)
    w, h = crop_fractions(u, height, width, spec.scale, (math.log(spec.ratio[0]), math.log(spec.ratio[1])))[:2]
    return (min(width, math.ceil(spec.size / w.min().item())), min(height, math.ceil(spec.size / h.min().item())))


def view_crops(image: torch.Tensor, index: int, epoch: int, spec: ViewCropSpec) -> torch.Tensor:
    """uint8 ``(views, C, size, size)``: the views' crops of one decoded uint8 ``(C, H, W)`` image."""
    u = view_uniforms(index, epoch, spec)
    height, width = image.shape[-2:]
    return torch.stack([v2.functional.resized_crop(image, *crop_box(height, width, u[v], spec),
                                                   size=[spec.size, spec.size], antialias=True)
                        for v in range(spec.views)])
