"""Local units: which stages each unit of end-to-end SimCLR, Greedy InfoMax and LoCo spans."""
from __future__ import annotations

from collections.abc import Sequence

__all__ = ['MODES', 'Unit', 'make_units', 'check_units']

MODES = ('e2e', 'gim', 'loco')
Unit = tuple[int, int]


def make_units(mode: str, num_stages: int, top_unit: bool = False) -> list[Unit]:
    """The paper's units for ``mode`` over ``num_stages`` stages, as inclusive ``(first, last)`` stage indices.

    Args:
        mode: ``"e2e"`` (one unit over all stages), ``"gim"`` (one per stage) or ``"loco"`` (overlapping pairs).
        num_stages: Number of stages K.
        top_unit: LoCo only: add the unit ``(K-1, K-1)`` on the last stage alone.
    """
    if mode not in MODES:
        raise ValueError(f'unknown mode {mode!r}: use one of {", ".join(MODES)}')
    if mode == 'e2e':
        return [(0, num_stages - 1)]
    if mode == 'gim' or num_stages == 1:
        return [(k, k) for k in range(num_stages)]
    units = [(k, k + 1) for k in range(num_stages - 1)]
    return units + [(num_stages - 1, num_stages - 1)] if top_unit else units


def check_units(units: Sequence[Sequence[int]], num_stages: int) -> list[Unit]:
    checked = []
    for unit in units:
        ok = isinstance(unit, (tuple, list)) and len(unit) == 2 and all(isinstance(i, int) for i in unit)
        if not ok or not 0 <= unit[0] <= unit[1] < num_stages:
            raise ValueError(
                f'invalid unit {unit!r}: a unit is (first, last) stage indices with 0 <= first <= last < {num_stages}')
        checked.append((unit[0], unit[1]))
    if not checked:
        raise ValueError('units is empty: give at least one (first, last) unit')
    if len(set(checked)) != len(checked):
        raise ValueError(f'units {checked} repeat a unit: each (first, last) pair may appear once')
    return checked
