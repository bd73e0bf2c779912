"""A strict stand-in for CuPy on the CPU: arrays that live "on a device" and refuse every implicit trip to
or from the host, so a hidden round trip in the pipeline fails a test here instead of costing a sync on
the GPU.

What CuPy forbids, this forbids: ``np.asarray(device_array)`` (``__array__``), mixing device arrays with
NumPy arrays in arithmetic, NumPy functions on device arrays. What CuPy allows but costs a transfer or a
sync is allowed and counted: ``xp.asarray(host)`` (upload), ``.get()`` (download), ``bool()/int()/
float()/.item()`` of a device scalar (sync). Indexing a device array with a NumPy index array (an upload
CuPy does silently) is refused. Tests assert on the counters, e.g. that the number of syncs does not
grow with the number of tiles.
"""
from __future__ import annotations

import builtins
import types
from dataclasses import dataclass, field

import numpy as np
import scipy.ndimage as _ndi
from numpy.lib.mixins import NDArrayOperatorsMixin

from flare_rt.xp import register_ndimage


class HostConversionError(TypeError):
    """An implicit host<->device conversion (CuPy raises TypeError for these)."""


@dataclass
class Counters:
    uploads: list[int] = field(default_factory=list)  # bytes per xp.asarray(host)
    downloads: list[int] = field(default_factory=list)  # bytes per .get()
    syncs: int = 0  # scalar reads of device values

    def reset(self) -> None:
        self.uploads.clear()
        self.downloads.clear()
        self.syncs = 0


COUNTERS = Counters()


def _is_host_array(x) -> bool:
    return isinstance(x, np.ndarray) and x.ndim > 0


def _unwrap(x, what: str):
    if isinstance(x, StrictArray):
        return x._a
    if _is_host_array(x):
        raise HostConversionError(f"{what}: a NumPy array where a device array is expected (hidden upload); "
                                  "use xp.asarray explicitly")
    if isinstance(x, (list, tuple)):
        return type(x)(_unwrap(v, what) for v in x)
    return x


def _wrap(x):
    if isinstance(x, np.ndarray):
        return StrictArray(x)
    if isinstance(x, np.generic):  # reductions give 0-d device arrays in CuPy, not host scalars
        return StrictArray(np.asarray(x))
    if isinstance(x, tuple):
        return tuple(_wrap(v) for v in x)
    if isinstance(x, list):
        return [_wrap(v) for v in x]
    return x


def _check_index(key):
    keys = key if isinstance(key, tuple) else (key,)
    for k in keys:
        if _is_host_array(k):
            raise HostConversionError("indexing a device array with a NumPy index array (hidden upload)")
        if isinstance(k, list):
            raise HostConversionError("indexing a device array with a Python list (hidden upload)")
    return tuple(_unwrap(k, "index") for k in keys) if isinstance(key, tuple) else _unwrap(key, "index")


class StrictArray(NDArrayOperatorsMixin):
    """A device array double: a NumPy array inside, the host kept out."""

    __array_priority__ = 100

    def __init__(self, a: np.ndarray):
        self._a = a

    # -- what CuPy refuses --------------------------------------------------------------------------
    def __array__(self, dtype=None, copy=None):
        raise HostConversionError("implicit conversion of a device array to a NumPy array; use .get()")

    def __array_function__(self, func, types_, args, kwargs):
        raise HostConversionError(f"numpy.{func.__name__} called on a device array; use the array module (xp)")

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        args = [_unwrap(x, f"numpy.{ufunc.__name__}") for x in inputs]
        if "out" in kwargs:
            kwargs["out"] = tuple(_unwrap(o, "out") for o in kwargs["out"])
        result = getattr(ufunc, method)(*args, **kwargs)
        return _wrap(result)

    def __array_namespace__(self, api_version=None):
        return MODULE

    # -- what CuPy allows at a cost -----------------------------------------------------------------
    def get(self) -> np.ndarray:
        COUNTERS.downloads.append(self._a.nbytes)
        return self._a.copy()

    def _scalar(self):
        if self._a.size != 1:
            raise ValueError("only size-1 device arrays convert to Python scalars")
        COUNTERS.syncs += 1
        return self._a.reshape(()).item()

    def __bool__(self):
        return builtins.bool(self._scalar())

    def __int__(self):
        return builtins.int(self._scalar())

    def __index__(self):
        return builtins.int(self._scalar())

    def __float__(self):
        return builtins.float(self._scalar())

    def item(self):
        return self._scalar()

    def tolist(self):
        raise HostConversionError("tolist() of a device array (a download); use .get() where it is meant")

    # -- array behaviour ----------------------------------------------------------------------------
    def __getitem__(self, key):
        return _wrap(self._a[_check_index(key)])

    def __setitem__(self, key, value):
        self._a[_check_index(key)] = _unwrap(value, "assignment")

    def __iter__(self):
        return (_wrap(v) for v in self._a)

    def __len__(self):
        return len(self._a)

    def __repr__(self):
        return f"StrictArray({self._a.shape}, {self._a.dtype})"

    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    nbytes = property(lambda self: self._a.nbytes)
    strides = property(lambda self: self._a.strides)
    T = property(lambda self: StrictArray(self._a.T))
    flags = property(lambda self: self._a.flags)

    def __getattr__(self, name):
        if name.startswith("__"):  # __array_interface__, __array_struct__, ...: the host's protocols stay shut
            raise AttributeError(name)
        attr = getattr(self._a, name)
        if not callable(attr):
            return _wrap(attr)

        def method(*args, **kwargs):
            args = [_unwrap(a, f".{name}()") for a in args]
            kwargs = {k: _unwrap(v, f".{name}()") for k, v in kwargs.items()}
            return _wrap(attr(*args, **kwargs))

        return method


def _module_function(name: str):
    fn = getattr(np, name)

    def f(*args, **kwargs):
        args = [_unwrap(a, f"xp.{name}") for a in args]
        kwargs = {k: _unwrap(v, f"xp.{name}") for k, v in kwargs.items()}
        return _wrap(fn(*args, **kwargs))

    f.__name__ = name
    return f


def asarray(a, dtype=None, order=None):
    if isinstance(a, StrictArray):
        return a if dtype is None else a.astype(dtype)
    host = np.asarray(a, dtype=dtype)
    COUNTERS.uploads.append(host.nbytes)
    return StrictArray(np.array(host, order=order or "K"))


def array(a, dtype=None, copy=True):
    if isinstance(a, StrictArray):
        return StrictArray(np.array(a._a, dtype=dtype, copy=copy))
    return asarray(a, dtype)


def ascontiguousarray(a, dtype=None):
    if not isinstance(a, StrictArray):
        raise HostConversionError("xp.ascontiguousarray of a host array (hidden upload); use xp.asarray")
    return StrictArray(np.ascontiguousarray(a._a, dtype=dtype))


def _build_module() -> types.ModuleType:
    mod = types.ModuleType("strict_xp.device", "CuPy's strictness on the CPU (a test double)")
    for name in ("zeros", "ones", "empty", "full", "zeros_like", "ones_like", "empty_like", "full_like",
                 "stack", "concatenate", "where", "clip", "maximum", "minimum", "exp", "log", "abs", "sqrt",
                 "flip", "moveaxis", "transpose", "pad", "nonzero", "flatnonzero", "arange", "argmax", "floor",
                 "round", "rint", "any", "all", "sum", "mean", "broadcast_to", "expand_dims", "squeeze",
                 "logical_and", "logical_or", "logical_not", "isfinite", "count_nonzero", "cumsum", "take",
                 "linspace", "meshgrid", "indices", "unique", "bincount", "searchsorted", "repeat",
                 "copyto", "multiply", "add", "subtract", "divide", "less", "greater", "equal", "not_equal"):
        setattr(mod, name, _module_function(name))
    for name in ("float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16", "bool_",
                 "dtype", "ndarray", "newaxis", "inf", "nan", "pi", "result_type", "iinfo", "finfo",
                 "issubdtype", "integer", "floating"):
        setattr(mod, name, getattr(np, name))
    mod.asarray, mod.array, mod.ascontiguousarray = asarray, array, ascontiguousarray
    mod.asnumpy = lambda a: a.get() if isinstance(a, StrictArray) else np.asarray(a)
    mod.StrictArray = StrictArray
    return mod


MODULE = _build_module()


def _ndimage_function(name: str):
    fn = getattr(_ndi, name)

    def f(*args, **kwargs):
        args = [_unwrap(a, f"ndimage.{name}") for a in args]
        kwargs = {k: _unwrap(v, f"ndimage.{name}") for k, v in kwargs.items()}
        return _wrap(fn(*args, **kwargs))

    return f


NDIMAGE = types.ModuleType("strict_xp.ndimage")
for _name in ("zoom", "map_coordinates", "gaussian_filter", "binary_fill_holes", "label", "find_objects"):
    setattr(NDIMAGE, _name, _ndimage_function(_name))
register_ndimage(MODULE, NDIMAGE)


def to_device(a: np.ndarray) -> StrictArray:
    """Upload (counted)."""
    return asarray(a)
