"""Loader throughput per CPU core on synthetic ImageNet-like JPEGs: this project's loader against the anchor a timm
user would otherwise use, measured in the same run.

Images: ``--images`` JPEGs of ImageNet's typical size (width 250-550, height 200-500, mean about 400x350) at quality
90, with smooth colour fields plus fine texture so they compress to ImageNet-like file sizes (the mean is printed).
Every pipeline produces two 224 px SimCLR views per image from one decode, with the same crop distribution (area
8-100 % of the whole image, aspect 3/4-4/3), flip, colour jitter (0.4, 0.4, 0.4, 0.1; p 0.8), grayscale (p 0.2) and
blur (p 0.5):

* ``anchor``: torchvision's ``ImageFolder`` (PIL decode at full size) with the torchvision v2 SimCLR transforms,
  applied twice to the decoded image, all on the CPU;
* ``anchor, crop and flip only``: the same without the colour and blur steps (uint8 out), what the anchor's CPUs
  would do if those steps ran on the GPU, the like-for-like comparison with ``ours``;
* ``ours``: ``loco_timm``'s loader item (:mod:`loco_timm.data.sources`): JPEG draft decoding at the smallest scale no
  crop upsamples, both views cut from the whole image; flip, colour and blur run batched on the training device;
* ``ours, no draft``: the same at full decode;
* ``ours + CPU augmentation``: ``ours`` plus the batched augmentation on the CPU (batches of 64), for training
  without a GPU.

Each pipeline runs in this process with one thread (``torch.set_num_threads(1)``), so img/s is per core (a
DataLoader worker is one such process); the pipelines take turns, and the median of ``--repeats`` passes over the
images is reported, with the cores needed to feed 1,000 and 3,000 img/s. Writes ``benchmarks/results/loader_cpu.json``
and the documentation block ``loader`` (docs/data.md).
"""
from __future__ import annotations

import argparse
import io
import math
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from doc_blocks import cpu_name, write_report  # noqa: E402

SIZE, SCALE = 224, (0.08, 1.0)
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TARGETS = (1000, 3000)


def make_images(root: Path, count: int, seed: int = 0) -> float:
    """``count`` JPEGs in ``root/train/<class>/``; returns their mean size in KB."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    sizes = []
    for i in range(count):
        w, h = int(rng.integers(250, 551)), int(rng.integers(200, 501))
        coarse = rng.uniform(0, 255, (max(2, h // 40), max(2, w // 40), 3)).astype(np.uint8)
        field = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), dtype=np.float32)
        pixels = np.clip(field + rng.normal(0, 32, (h, w, 3)), 0, 255).astype(np.uint8)
        folder = root / 'train' / f'class{i % 10}'
        folder.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format='JPEG', quality=90)
        (folder / f'{i:05d}.jpg').write_bytes(buf.getvalue())
        sizes.append(len(buf.getvalue()) / 1024)
    return statistics.mean(sizes)


def anchor_dataset(root: Path, colour: bool = True):
    """torchvision ImageFolder + the SimCLR transforms, two views of one decode (``colour=False``: only the crop
    and flip, to uint8, for a colour stage elsewhere)."""
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import v2
    steps = [v2.RandomResizedCrop(SIZE, scale=SCALE, antialias=True), v2.RandomHorizontalFlip()]
    if colour:
        steps += [v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), v2.RandomGrayscale(p=0.2),
                  v2.RandomApply([v2.GaussianBlur(23, sigma=(0.1, 2.0))], p=0.5)]
    steps += [v2.PILToTensor()] + ([v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)] if colour else [])
    view = v2.Compose(steps)
    return ImageFolder(str(root / 'train'), transform=lambda img: (view(img), view(img)))


def ours_dataset(root: Path, draft: bool):
    from loco_timm.data.crops import KEY_STRIDE, ViewCropSpec
    from loco_timm.data.datasets import build_dataset
    ds = build_dataset('imagefolder', 'pretrain', root, SIZE, crops=ViewCropSpec(SIZE, SCALE), draft=draft)
    return ds, KEY_STRIDE


def _rates(pipelines: dict, count: int, repeats: int) -> dict:
    """Median img/s of each pipeline over ``repeats`` passes, the pipelines taking turns within each repeat (so a
    slow spell of a shared machine hits all of them alike)."""
    rates: dict[str, list[float]] = {name: [] for name in pipelines}
    for _ in range(repeats):
        for name, fetch in pipelines.items():
            start = time.perf_counter()
            for i in range(count):
                fetch(i)
            rates[name].append(count / (time.perf_counter() - start))
    return {name: statistics.median(values) for name, values in rates.items()}


def measure(root: Path, count: int, repeats: int, batch: int = 64) -> dict:
    from loco_timm.data.augment import SimCLRAugment
    torch.set_num_threads(1)
    anchor, crop_only = anchor_dataset(root), anchor_dataset(root, colour=False)
    (ours, stride), (no_draft, _) = ours_dataset(root, True), ours_dataset(root, False)
    augment = SimCLRAugment(SIZE, scale=SCALE, mean=MEAN, std=STD)
    pending: list = []

    def with_augment(i):
        pending.append(ours[stride + i])
        if len(pending) == batch or i == count - 1:
            views = torch.stack([p[0] for p in pending])
            index = torch.tensor([p[2] for p in pending])
            for v in (0, 1):
                augment(views[:, v], index, 0, 1, v, cropped=True)
            pending.clear()
    return _rates({'anchor': lambda i: anchor[i], 'anchor, crop and flip only': lambda i: crop_only[i],
                   'ours': lambda i: ours[stride + i],  # epoch 1
                   'ours, no draft': lambda i: no_draft[stride + i],
                   'ours + CPU augmentation': with_augment}, count, repeats)


def markdown(report: dict) -> str:
    rows = ['| pipeline (one core, two 224 px views per image) | img/s per core | vs anchor | cores for 1,000 img/s '
            '| cores for 3,000 img/s |', '|---|---:|---:|---:|---:|']
    anchor = report['img_per_s']['anchor']
    for name, rate in report['img_per_s'].items():
        rows.append(f'| {name} | {rate:.1f} | {rate / anchor:.2f}x | {math.ceil(1000 / rate)} | '
                    f'{math.ceil(3000 / rate)} |')
    return (f'Measured {report["date"]} on {report["machine"]} ({report["images"]} synthetic JPEGs, mean '
            f'{report["mean_kb"]:.0f} KB, median of {report["repeats"]} passes; `python benchmarks/loader.py`):\n\n'
            + '\n'.join(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--images', type=int, default=300)
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--out', default='benchmarks/results/loader_cpu.json')
    parser.add_argument('--no-readme', action='store_true', help='do not rewrite the documentation block')
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        mean_kb = make_images(Path(tmp), args.images)
        rates = measure(Path(tmp), args.images, args.repeats)
    report = dict(date=str(date.today()), machine=f'{cpu_name()}, 1 thread',
                  images=args.images, mean_kb=round(mean_kb, 1), repeats=args.repeats,
                  img_per_s={k: round(v, 1) for k, v in rates.items()},
                  ours_vs_anchor=round(rates['ours'] / rates['anchor'], 2))
    write_report(report, args.out, 'loader', markdown(report), readme=not args.no_readme)


if __name__ == '__main__':
    main()
