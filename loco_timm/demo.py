"""A short demo of LocalLearner on a real batch of Fashion-MNIST (``python -m loco_timm.demo``).

It builds ``loco_resnet18_small`` (a ResNet-18-style timm backbone for 28 px images), wraps it as E2E, GIM and
LoCo learners with the same initial weights, takes a few optimiser steps on two augmented views of the same
Fashion-MNIST images and prints each unit's loss before and after. ``loco-timm train`` is the full training job.
"""
from __future__ import annotations

import argparse
import copy
import time

import timm
import torch
from torchvision.transforms import v2

from . import models  # noqa: F401  (registers loco_resnet18_small)
from .core.learner import MODES, LocalLearner
from .data.datasets import fashion_mnist

__all__ = ['real_batch', 'main']


def real_batch(num_images: int, seed: int = 0, data_dir: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Two augmented views (random resized crop + flip) of ``num_images`` Fashion-MNIST training images."""
    dataset = fashion_mnist(train=True, data_dir=data_dir)
    generator = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(dataset), generator=generator)[:num_images]
    images = dataset.data[index].unsqueeze(1).float().div(255)
    augment = v2.Compose([v2.RandomResizedCrop(28, scale=(0.3, 1.0), antialias=True), v2.RandomHorizontalFlip()])
    torch.manual_seed(seed)
    views = [torch.stack([augment(img) for img in images]) for _ in range(2)]
    return tuple((v - 0.2860) / 0.3530 for v in views)


def main(argv: list[str] | None = None) -> dict[str, list[dict[int, float]]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--images', type=int, default=128, help='images in the batch (default 128)')
    parser.add_argument('--steps', type=int, default=10, help='optimiser steps per mode (default 10)')
    parser.add_argument('--data-dir', default=None, help='folder with the Fashion-MNIST IDX files')
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    view1, view2 = real_batch(args.images, data_dir=args.data_dir)
    base = timm.create_model('loco_resnet18_small')
    print(f'Fashion-MNIST batch: {args.images} images x 2 views of {tuple(view1.shape[1:])}')
    history = {}
    for mode in MODES:
        learner = LocalLearner(copy.deepcopy(base), mode=mode, input_size=(1, 28, 28))
        optimizer = torch.optim.SGD(learner.parameters(), lr=0.05, momentum=0.9)
        start = time.perf_counter()
        history[mode] = []
        for _ in range(args.steps):
            optimizer.zero_grad(set_to_none=True)
            history[mode].append({j: loss.item() for j, loss in learner.step(view1, view2).items()})
            optimizer.step()
        seconds = (time.perf_counter() - start) / args.steps
        first, last = history[mode][0], history[mode][-1]
        units = ', '.join(f'{learner.units[j]}: {first[j]:.3f} -> {last[j]:.3f}' for j in first)
        print(f'{mode:4s} units (first, last stage) loss step 1 -> {args.steps}: {units}   [{seconds:.2f} s/step]')
    return history


if __name__ == '__main__':
    main()
