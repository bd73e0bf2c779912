"""Array-module helpers: the pipeline's array code takes numpy or CuPy arrays and uses the matching
``ndimage`` (``scipy.ndimage`` / ``cupyx.scipy.ndimage``), so the GPU runtime runs the same functions.

Rules the pipeline keeps so that a GPU run has no hidden host round trips: arrays move between host
and device only through :func:`to_device` and :func:`to_host`; index arrays built on the host are
moved with :func:`to_device` (once, not per call); scalar reads of device values (``bool(...)``,
``int(...)``) happen per block or per case, never per tile. The tests run every pipeline function on a
strict double of CuPy that enforces this.
"""
from __future__ import annotations

import types

import numpy as np

_NDIMAGE: dict[str, types.ModuleType] = {}


def array_module(a) -> types.ModuleType:
    """numpy for numpy arrays (and scalars), cupy for cupy arrays (without importing cupy otherwise),
    else the array's own namespace (the array API's ``__array_namespace__``)."""
    if isinstance(a, (np.ndarray, np.generic)):
        return np
    if type(a).__module__.startswith("cupy"):
        import cupy

        return cupy
    namespace = getattr(a, "__array_namespace__", None)
    return namespace() if namespace is not None else np


def ndimage_module(xp: types.ModuleType) -> types.ModuleType:
    if xp is np:
        import scipy.ndimage as ndi

        return ndi
    if xp.__name__ == "cupy":
        import cupyx.scipy.ndimage as ndi

        return ndi
    return _NDIMAGE[xp.__name__]


def register_ndimage(xp: types.ModuleType, ndimage: types.ModuleType) -> None:
    """The ``ndimage`` of another array module (a test double of CuPy)."""
    _NDIMAGE[xp.__name__] = ndimage


def is_host(xp: types.ModuleType) -> bool:
    return xp is np


def to_device(a, xp: types.ModuleType):
    """``a`` as an array of ``xp`` (an explicit upload when ``xp`` is a device module)."""
    return a if array_module(a) is xp else xp.asarray(a)


def to_host(a) -> np.ndarray:
    """``a`` as a numpy array (an explicit download for device arrays)."""
    if isinstance(a, np.ndarray):
        return a
    return a.get() if hasattr(a, "get") else np.asarray(a)


to_numpy = to_host  # the name older callers use
