"""The timm model API shared by loco-timm's own architectures: a stem (``conv1`` + ``maxpool``), ``stages`` (an
``nn.Sequential`` of stages), an optional tail after the last stage (:meth:`StagedNet.forward_tail`, ShuffleNet's
``conv6``), and timm's ``ClassifierHead`` as ``head``. Scriptable with ``torch.jit.script`` (so no postponed
annotations here: TorchScript reads them), and built directly on any device (:func:`build_on`).
"""
import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from timm.layers import ClassifierHead
from timm.models import checkpoint_seq
from timm.models._features import feature_take_indices
from torch import nn

__all__ = ['StagedNet', 'build_on']


@contextlib.contextmanager
def build_on(device: str | torch.device | None) -> Iterator[None]:
    """Create the parameters and buffers of modules built inside on ``device`` (timm's ``device`` construction
    argument; ``'meta'`` allocates nothing)."""
    with torch.device(device) if device is not None else contextlib.nullcontext():
        yield


class StagedNet(nn.Module):
    """Subclasses set ``conv1``, ``maxpool``, ``stages``, ``head``, ``num_classes`` and ``grad_checkpointing``, and
    override :meth:`forward_tail` (and :meth:`_remove_tail`) where a module runs after the last stage (the last
    ``feature_info`` level is then its output)."""

    def _init_head(self, num_features: int, num_classes: int, global_pool: str, drop_rate: float) -> None:
        """timm's classifier head on ``num_features`` channels, then He-initialised convolutions."""
        self.num_features = self.head_hidden_size = num_features
        self.head = ClassifierHead(num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')

    def forward_tail(self, x: torch.Tensor) -> torch.Tensor:
        """What runs after the last stage (nothing here)."""
        return x

    def _remove_tail(self) -> None:
        """Drop the tail (pruned intermediate layers)."""

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(stem=r'^conv1', blocks=r'^stages\.(\d+)' if coarse else r'^stages\.(\d+)\.(\d+)')

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, pool_type=global_pool)

    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = 'NCHW',
                              intermediates_only: bool = False,
                              ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """The stages' outputs, the last one after the tail (timm's ``forward_intermediates`` protocol)."""
        if output_fmt != 'NCHW':
            raise ValueError(f'output_fmt {output_fmt!r}: {type(self).__name__} gives NCHW maps only')
        take, last = feature_take_indices(len(self.stages), indices)
        intermediates = []
        x = self.maxpool(self.conv1(x))
        for i, stage in enumerate(self.stages[:last + 1] if stop_early else self.stages):
            x = stage(x)
            if i == len(self.stages) - 1:
                x = self.forward_tail(x)
            if i in take:
                intermediates.append(x)
        return intermediates if intermediates_only else (x, intermediates)

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the stages (and the tail) after the last level ``indices`` asks for."""
        take, last = feature_take_indices(len(self.stages), indices)
        if last < len(self.stages) - 1:
            self.stages = self.stages[:last + 1]
            self._remove_tail()
        if prune_head:
            self.reset_classifier(0, '')
        return take

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.conv1(x))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.stages, x)
        else:
            x = self.stages(x)
        return self.forward_tail(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
