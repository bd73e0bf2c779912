"""Array-module helpers: the pipeline's array code takes numpy or CuPy arrays and uses the matching
``ndimage`` (``scipy.ndimage`` / ``cupyx.scipy.ndimage``), so the GPU runtime runs the same functions."""
from __future__ import annotations

import types

import numpy as np


def array_module(a) -> types.ModuleType:
    """numpy for numpy arrays, cupy for cupy arrays (without importing cupy otherwise)."""
    if type(a).__module__.startswith("cupy"):
        import cupy

        return cupy
    return np


def ndimage_module(xp: types.ModuleType) -> types.ModuleType:
    if xp is np:
        import scipy.ndimage as ndi

        return ndi
    import cupyx.scipy.ndimage as ndi  # noqa: F811

    return ndi


def to_numpy(a) -> np.ndarray:
    return a.get() if hasattr(a, "get") and not isinstance(a, np.ndarray) else np.asarray(a)
