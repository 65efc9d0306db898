"""Batched SimCLR augmentation with per-sample randomness that does not depend on how samples are batched.

Why batched: for small images (Fashion-MNIST, CIFAR) a per-image torchvision v2 SimCLR pipeline costs about
2 ms per pair of views on one CPU core, so DataLoader workers, not the model, bound the step time.
:class:`SimCLRAugment` instead takes a whole uint8 batch, on whatever device it lives (the training GPU), and
applies every operation to all samples at once with per-sample parameters.

Determinism contract: every random draw of a sample comes from :func:`sample_uniforms`, i.e. from a CPU
``torch.Generator`` seeded with a 63-bit mix of ``(seed, epoch, dataset index, view)`` only. A sample therefore
gets the same augmentation (up to floating-point differences between devices and kernels) whatever the batch
composition or order, the number of processes or the number of DataLoader workers. Each parameter has a fixed
slot among :data:`NUM_UNIFORMS` uniforms, so adding an operation never changes the draws of the others.

Pipeline (in this order):

1. RandomResizedCrop to ``size`` and horizontal flip, as one ``affine_grid`` + bilinear ``grid_sample``
   (no antialiasing when the crop is shrunk, unlike torchvision's RandomResizedCrop). For decoded image files
   (ImageFolder) the loader cuts the crop from the whole image instead (:mod:`loco_timm.data.crops`, same draws) and
   only the flip is left here (``cropped=True``).
2. With probability ``jitter_p``, colour jitter in the fixed order brightness, contrast, saturation, hue
   (torchvision draws a random order), clamping to [0, 1] after each; hue rotates the chroma in YIQ space.
   Saturation and hue are no-ops on 1-channel images.
3. 3-channel only: grayscale (ITU-R 601) with probability ``grayscale_p``.
4. Only when ``size >= blur_min_size``: Gaussian blur with probability ``blur_p``, sigma in U(0.1, 2.0),
   odd kernel of about 10% of ``size``, as separable depthwise convolutions with reflect padding.
5. Normalisation with ``mean``/``std`` (a length-1 value applies to every channel).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ['NUM_UNIFORMS', 'SimCLRAugment', 'sample_uniforms', 'crop_fractions']

NUM_UNIFORMS = 16
# Fixed uniform slots; 13-15 are spare.
_AREA, _RATIO, _CX, _CY, _FLIP, _JITTER, _BRIGHT, _CONTRAST, _SAT, _HUE, _GRAY, _BLUR, _SIGMA = range(13)

_MASK64 = (1 << 64) - 1
_MASK63 = (1 << 63) - 1
_GRAY_WEIGHTS = (0.299, 0.587, 0.114)
_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
                           dtype=torch.float64)
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _mix(seed: int, epoch: int, index: int, view: int) -> int:
    """A 63-bit seed from chained splitmix64 rounds over the four integers."""
    h = 0
    for value in (seed, epoch, index, view):
        h = _splitmix64(h ^ (int(value) & _MASK64))
    return h & _MASK63


def sample_uniforms(indices: torch.Tensor, seed: int, epoch: int, view: int, count: int) -> torch.Tensor:
    """Per-sample uniforms that depend only on (seed, epoch, index, view).

    Args:
        indices: int64 ``(N,)`` dataset indices (any device).
        seed: run seed.
        epoch: epoch number.
        view: view number (e.g. 0 and 1 for the two SimCLR views).
        count: uniforms per sample.

    Returns:
        CPU float64 ``(N, count)`` uniforms in [0, 1); row ``i`` is ``torch.rand(count, dtype=float64)`` from a
        ``torch.Generator`` seeded with a 63-bit splitmix64 mix of ``(seed, epoch, indices[i], view)``.
    """
    index_list = indices.reshape(-1).tolist()
    out = torch.empty(len(index_list), count, dtype=torch.float64)
    generator = torch.Generator()
    for row, index in enumerate(index_list):
        generator.manual_seed(_mix(seed, epoch, index, view))
        torch.rand(count, generator=generator, dtype=torch.float64, out=out[row])
    return out


def crop_fractions(u: torch.Tensor, height: int, width: int, scale: Sequence[float],
                   log_ratio: Sequence[float]) -> tuple[torch.Tensor, ...]:
    """The random resized crop of samples with uniforms ``u`` ``(N, NUM_UNIFORMS)`` on ``height x width`` images:
    width and height as fractions of the image, and the centre in normalised [-1, 1] coordinates (the crop stays
    inside the image; a crop wider or taller than the image is clamped to it). Area in ``scale``, aspect ratio
    (width / height, in pixels) log-uniform in ``exp(log_ratio)``."""
    area = scale[0] + (scale[1] - scale[0]) * u[:, _AREA]
    ratio = torch.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[:, _RATIO])
    w = torch.sqrt(area * ratio * height / width).clamp(max=1.0)
    h = torch.sqrt(area / ratio * width / height).clamp(max=1.0)
    return w, h, (2 * u[:, _CX] - 1) * (1 - w), (2 * u[:, _CY] - 1) * (1 - h)


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma ``(N, 1, H, W)`` of a 3-channel batch (the batch itself if 1-channel)."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)
    return (_GRAY_WEIGHTS[0] * r + _GRAY_WEIGHTS[1] * g + _GRAY_WEIGHTS[2] * b).unsqueeze(1)


def _per_sample(values: torch.Tensor) -> torch.Tensor:
    """``(N,)`` -> ``(N, 1, 1, 1)`` float32 for broadcasting over images."""
    return values.to(torch.float32).view(-1, 1, 1, 1)


class SimCLRAugment(torch.nn.Module):
    """Batched SimCLR augmentation (crop+flip, colour jitter, grayscale, blur, normalise), see the module docs.

    Args:
        size: output height and width.
        scale: range of the crop's area as a fraction of the image.
        ratio: range of the crop's aspect ratio (width / height), drawn log-uniformly.
        flip_p: horizontal flip probability.
        jitter: colour jitter strengths (brightness, contrast, saturation, hue).
        jitter_p: probability of applying colour jitter.
        grayscale_p: grayscale probability (3-channel images only).
        blur_p: Gaussian blur probability.
        blur_min_size: blur is applied only when ``size`` is at least this.
        mean: normalisation mean, one value or one per channel.
        std: normalisation std, one value or one per channel.
    """

    def __init__(self, size: int, scale: Sequence[float] = (0.2, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3),
                 flip_p: float = 0.5, jitter: Sequence[float] = (0.4, 0.4, 0.4, 0.1), jitter_p: float = 0.8,
                 grayscale_p: float = 0.2, blur_p: float = 0.5, blur_min_size: int = 96,
                 mean: Sequence[float] = (0.5,), std: Sequence[float] = (0.5,)) -> None:
        super().__init__()
        if size < 1 or not 0 < scale[0] <= scale[1] or not 0 < ratio[0] <= ratio[1] or len(jitter) != 4:
            raise ValueError(f'bad SimCLRAugment arguments: size={size}, scale={scale}, ratio={ratio}, '
                             f'jitter={jitter}')
        self.size = int(size)
        self.scale = (float(scale[0]), float(scale[1]))
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        self.flip_p, self.jitter_p, self.grayscale_p, self.blur_p = flip_p, jitter_p, grayscale_p, blur_p
        self.jitter = tuple(float(j) for j in jitter)
        kernel = int(0.1 * self.size)
        self.kernel_size = max(3, kernel + 1 - kernel % 2)
        self.blur = self.size >= blur_min_size and self.size > self.kernel_size // 2  # reflect padding needs it
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)

    def extra_repr(self) -> str:
        return (f'size={self.size}, scale={self.scale}, flip_p={self.flip_p}, jitter={self.jitter}, '
                f'jitter_p={self.jitter_p}, grayscale_p={self.grayscale_p}, blur={self.blur}, blur_p={self.blur_p}')

    def _to_float(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f'expected (N, 1 or 3, H, W) images, got shape {tuple(images.shape)}')
        return images.float() / 255 if images.dtype == torch.uint8 else images.float()

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[1]
        stats = []
        for values in (self.mean, self.std):
            if len(values) not in (1, channels):
                raise ValueError(f'mean/std of length {len(values)} for {channels}-channel images')
            stats.append(torch.tensor(values, dtype=x.dtype, device=x.device).expand(channels).view(1, -1, 1, 1))
        return (x - stats[0]) / stats[1]

    def plain(self, images: torch.Tensor) -> torch.Tensor:
        """Deterministic resize to ``(size, size)`` (bilinear, antialias) and normalisation, for readout/eval."""
        x = self._to_float(images)
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode='bilinear', align_corners=False, antialias=True)
        return self._normalise(x)

    def _crop_flip(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        w, h, cx, cy = crop_fractions(u, height, width, self.scale, self.log_ratio)
        sx = torch.where(u[:, _FLIP] < self.flip_p, -w, w)
        theta = torch.zeros(x.shape[0], 2, 3, dtype=x.dtype, device=x.device)
        theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx, cx, h, cy
        grid = F.affine_grid(theta, [x.shape[0], x.shape[1], self.size, self.size], align_corners=False)
        return F.grid_sample(x, grid, mode='bilinear', padding_mode='border', align_corners=False)

    def _color_jitter(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        b, c, s, hue = self.jitter
        out = x
        if b > 0:
            out = (out * _per_sample(1 - b + 2 * b * u[:, _BRIGHT])).clamp(0, 1)
        if c > 0:
            mean = _grayscale(out).mean(dim=(1, 2, 3), keepdim=True)
            factor = _per_sample(1 - c + 2 * c * u[:, _CONTRAST])
            out = (factor * out + (1 - factor) * mean).clamp(0, 1)
        if x.shape[1] == 3 and s > 0:
            factor = _per_sample(1 - s + 2 * s * u[:, _SAT])
            out = (factor * out + (1 - factor) * _grayscale(out)).clamp(0, 1)
        if x.shape[1] == 3 and hue > 0:
            angle = 2 * math.pi * hue * (2 * u[:, _HUE] - 1)
            cos, sin = torch.cos(angle), torch.sin(angle)
            rotation = torch.zeros(x.shape[0], 3, 3, dtype=x.dtype, device=x.device)
            rotation[:, 0, 0], rotation[:, 1, 1], rotation[:, 2, 2] = 1, cos, cos
            rotation[:, 1, 2], rotation[:, 2, 1] = -sin, sin
            matrix = _YIQ_TO_RGB.to(x.device, x.dtype) @ rotation @ _RGB_TO_YIQ.to(x.device, x.dtype)
            out = torch.einsum('nij,njhw->nihw', matrix, out).clamp(0, 1)
        return torch.where((u[:, _JITTER] < self.jitter_p).view(-1, 1, 1, 1), out, x)

    def _gaussian_blur(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        n, channels, height, width = x.shape
        sigma = 0.1 + 1.9 * u[:, _SIGMA]
        offsets = torch.arange(self.kernel_size, dtype=x.dtype, device=x.device) - self.kernel_size // 2
        kernel = torch.exp(-offsets.square() / (2 * sigma.square().unsqueeze(1)))
        kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(channels, dim=0)
        pad = self.kernel_size // 2
        flat = x.reshape(1, n * channels, height, width)
        flat = F.conv2d(F.pad(flat, (pad, pad, 0, 0), mode='reflect'), kernel.view(-1, 1, 1, self.kernel_size),
                        groups=n * channels)
        flat = F.conv2d(F.pad(flat, (0, 0, pad, pad), mode='reflect'), kernel.view(-1, 1, self.kernel_size, 1),
                        groups=n * channels)
        return torch.where((u[:, _BLUR] < self.blur_p).view(-1, 1, 1, 1), flat.view_as(x), x)

    def forward(self, images: torch.Tensor, indices: torch.Tensor, seed: int, epoch: int,
                view: int, cropped: bool = False) -> torch.Tensor:
        """Augment a batch.

        Args:
            images: uint8 ``(N, C, H, W)`` with C = 1 or 3, on any device.
            indices: int64 ``(N,)`` dataset indices of the images.
            seed: run seed.
            epoch: epoch number.
            view: view number.
            cropped: The images are this view's random resized crops already, cut from the whole decoded image by
                the loader with the same draws (:mod:`loco_timm.data.crops`): only the flip of step 1 remains.

        Returns:
            float32 ``(N, C, size, size)`` normalised with mean/std, on ``images.device``.
        """
        if indices.numel() != images.shape[0]:
            raise ValueError(f'{indices.numel()} indices for {images.shape[0]} images')
        x = self._to_float(images)
        # Drawn in float64 on the CPU; float32 on the device (MPS has no float64).
        u = sample_uniforms(indices, seed, epoch, view, NUM_UNIFORMS).to(x.device, torch.float32)
        if cropped:
            if x.shape[-2:] != (self.size, self.size):
                raise ValueError(f'cropped views must be {self.size}x{self.size}, got {tuple(x.shape[-2:])}')
            x = torch.where((u[:, _FLIP] < self.flip_p).view(-1, 1, 1, 1), x.flip(-1), x)
        else:
            x = self._crop_flip(x, u)
        if self.jitter_p > 0 and any(j > 0 for j in self.jitter):
            x = self._color_jitter(x, u)
        if x.shape[1] == 3 and self.grayscale_p > 0:
            x = torch.where((u[:, _GRAY] < self.grayscale_p).view(-1, 1, 1, 1), _grayscale(x).expand_as(x), x)
        if self.blur and self.blur_p > 0:
            x = self._gaussian_blur(x, u)
        return self._normalise(x)
