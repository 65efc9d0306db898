"""matplotlib, an optional dependency (the ``plot`` extra): every figure of the evaluation is drawn through
:func:`pyplot`, and where matplotlib is not installed the results are written without their figures and one line
says so (:data:`NO_MATPLOTLIB`)."""
from __future__ import annotations

import importlib.util
from types import ModuleType

__all__ = ['pyplot', 'NO_MATPLOTLIB']

NO_MATPLOTLIB = "matplotlib is not installed (pip install 'loco-timm[plot]')"


def pyplot() -> ModuleType | None:
    """``matplotlib.pyplot`` on the file-only Agg backend, or None where matplotlib is not installed."""
    if importlib.util.find_spec('matplotlib') is None:
        return None
    import matplotlib  # optional dependency: imported only when installed
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt
