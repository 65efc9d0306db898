"""Activation memory of a step, measured exactly: the bytes autograd saves for backward.

:class:`SavedTensorMeter` is a ``torch.autograd.graph.saved_tensors_hooks`` context that tracks the live saved
tensors: each storage counts once however many ops save it (views and aliases included), parameters (and any other
tensor passed as ``exclude``) do not count, and a tensor stops counting when autograd frees the graph that saved it.
``peak`` is the largest number of live bytes seen. On CPU this is deterministic, so tests can assert on it; it is the
activation memory a schedule keeps, independent of the allocator.
"""
from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch

__all__ = ['SavedTensorMeter', 'saved_bytes']


class _Saved:
    __slots__ = ('tensor', '__weakref__')

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


class SavedTensorMeter(torch.autograd.graph.saved_tensors_hooks):
    """Count live bytes saved for backward while the context is active.

    Args:
        exclude: tensors not to count (by storage), e.g. ``model.parameters()``.

    Attributes:
        current: bytes saved by graphs that are still alive.
        peak: the maximum of ``current`` since the context was entered (or :meth:`reset_peak`).
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self._exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self._live: dict[tuple[str, int], list[int]] = {}  # storage key -> [bytes, references]
        self.current = self.peak = 0
        super().__init__(self._pack, self._unpack)

    def __enter__(self) -> SavedTensorMeter:
        super().__enter__()
        return self

    def reset_peak(self) -> None:
        self.peak = self.current

    def _pack(self, tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() in self._exclude or tensor.device.type == 'meta' or storage.nbytes() == 0:
            return tensor
        key = (str(tensor.device), storage.data_ptr())
        entry = self._live.get(key)
        if entry is None:
            self._live[key] = [storage.nbytes(), 1]
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
        else:
            entry[1] += 1
        saved = _Saved(tensor.detach())  # no grad_fn: a saved output would otherwise keep its own graph alive
        weakref.finalize(saved, self._release, key)
        return saved

    @staticmethod
    def _unpack(saved):
        return saved.tensor if isinstance(saved, _Saved) else saved

    def _release(self, key: tuple[str, int]) -> None:
        entry = self._live[key]
        entry[1] -= 1
        if entry[1] == 0:
            del self._live[key]
            self.current -= entry[0]


def saved_bytes(fn, *args, exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes ``fn(*args)`` saves for backward (its graph kept alive until measured)."""
    with SavedTensorMeter(exclude) as meter:
        out = fn(*args)
        used = meter.current
        del out
    return used
