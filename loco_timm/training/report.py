"""What a training run reports: per-unit losses (Accelerate's tracker and ``losses.jsonl``), its throughput, and the
machine that trained it (``train_summary.json``)."""
from __future__ import annotations

import importlib.util
import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = ['Meter', 'machine_name', 'tracker', 'append_loss_row']


@dataclass
class Meter:
    """Throughput and the newest per-unit losses of a run (the loop feeds it one step at a time)."""
    start: float = field(default_factory=time.perf_counter)
    data_time: float = 0.0
    step_time: float = 0.0
    images: int = 0
    last: dict = field(default_factory=dict)

    def add(self, tick: float, ready: float, done: float, images: int, losses: torch.Tensor | None) -> None:
        """A step that waited for data from ``tick`` to ``ready`` and computed until ``done``."""
        self.data_time, self.step_time = self.data_time + ready - tick, self.step_time + done - ready
        self.images += images
        if losses is not None:
            self.last = {f'loss/unit{j}': v for j, v in enumerate(losses.tolist())}

    def summary(self, steps: int, checkpoint: Path, processes: int, device: torch.device) -> dict:
        """``train_summary.json``: steps, wall time, throughput (loader and model apart), last losses, machine."""
        wall = time.perf_counter() - self.start
        return dict(steps=steps, wall_seconds=round(wall, 1), checkpoint=str(checkpoint), last_losses=self.last,
                    img_per_s=_rate(self.images, wall), loader_img_per_s=_rate(self.images, self.data_time),
                    model_img_per_s=_rate(self.images, self.step_time), processes=processes,
                    machine=machine_name(device))


def _rate(images: int, seconds: float) -> float | None:
    return round(images / seconds, 1) if seconds else None


def tracker(name: str) -> str | None:
    """The Accelerate tracker to log with: ``tensorboard`` where it is installed (an optional dependency)."""
    return 'tensorboard' if name == 'tensorboard' and importlib.util.find_spec('tensorboard') is not None else None


def append_loss_row(path: Path, row: dict) -> None:
    """One row of the plain-text loss curves (``losses.jsonl``; a resume cuts it back to its checkpoint)."""
    with open(path, 'a') as log_file:
        log_file.write(json.dumps(row) + '\n')


def machine_name(device: torch.device) -> str:
    """The accelerator's name, or the CPU's model name (``/proc/cpuinfo``) on the CPU: what a run's summary records
    as the machine that trained it."""
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
