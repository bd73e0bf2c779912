"""Test double of the CuPy pieces flare-rt's TensorRT path uses (not a CuPy: just enough of it).

"Device" arrays live in host memory: ``.data.ptr`` is a real address, so the TensorRT double can read
the input and write the output through the pointers it is given, and a pointer into no live
allocation is caught (``find_allocation``) instead of crashing. Implicit conversion to numpy raises,
as CuPy's does. Streams are context managers with distinct ``.ptr`` values; the null stream's is 0.

Configured by environment variables, so a subprocess with this folder on PYTHONPATH sees the same
machine: FAKE_CUDA_DEVICES (device count; -1: no driver), FAKE_GPU_NAME, FAKE_GPU_CC ("7.5").
"""
from __future__ import annotations

import itertools
import os
import types
import weakref

import numpy as np

__version__ = "0.0-fake"
_LIVE: dict[int, tuple[int, weakref.ref]] = {}  # base address -> (nbytes, owner)


def find_allocation(ptr: int, nbytes: int) -> None:
    """Raise unless [ptr, ptr + nbytes) lies inside a live allocation."""
    for base, (size, ref) in list(_LIVE.items()):
        if ref() is not None and base <= ptr and ptr + nbytes <= base + size:
            return
    raise ValueError(f"pointer {ptr:#x} (+{nbytes} bytes) is in no live device allocation")


class _Flags:
    def __init__(self, a: np.ndarray):
        self.c_contiguous = bool(a.flags.c_contiguous)


class ndarray:
    def __init__(self, host: np.ndarray, owner: ndarray | None = None):
        self._a = host
        self._owner = owner if owner is not None else self
        if owner is None:
            _LIVE[host.ctypes.data] = (host.nbytes, weakref.ref(self))

    @property
    def data(self):
        return types.SimpleNamespace(ptr=self._a.ctypes.data)

    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    flags = property(lambda self: _Flags(self._a))

    def __len__(self):
        return len(self._a)

    def __getitem__(self, idx):
        return ndarray(self._a[idx], self._owner)

    def get(self) -> np.ndarray:
        return self._a.copy()

    def astype(self, dtype, copy=True):
        return ndarray(np.array(self._a, dtype=dtype, copy=True))

    def __array__(self, *args, **kwargs):
        raise TypeError("Implicit conversion to a NumPy array is not allowed (fake cupy, as CuPy)")


def empty(shape, dtype=np.float32):
    return ndarray(np.empty(shape, dtype=dtype))


def asarray(a, dtype=None):
    if isinstance(a, ndarray):
        return a if dtype is None or a.dtype == dtype else a.astype(dtype)
    return ndarray(np.array(a, dtype=dtype, copy=True))


def ascontiguousarray(a, dtype=None):
    host = a._a if isinstance(a, ndarray) else np.asarray(a)
    return ndarray(np.array(host, dtype=dtype or host.dtype, order="C", copy=True))


class _Runtime:
    class CUDARuntimeError(RuntimeError):
        pass

    @classmethod
    def getDeviceCount(cls) -> int:
        n = int(os.environ.get("FAKE_CUDA_DEVICES", "1"))
        if n < 0:
            raise cls.CUDARuntimeError("cudaErrorInsufficientDriver: CUDA driver version is insufficient")
        return n

    @staticmethod
    def getDevice() -> int:
        return 0

    @staticmethod
    def getDeviceProperties(device: int) -> dict:
        major, minor = os.environ.get("FAKE_GPU_CC", "7.5").split(".")
        return {"name": os.environ.get("FAKE_GPU_NAME", "Quadro RTX 5000").encode(), "major": int(major),
                "minor": int(minor), "totalGlobalMem": 16 << 30}


_ptrs = itertools.count(0x7000)


class Stream:
    null: Stream

    def __init__(self, ptr: int | None = None, non_blocking: bool = False):
        self.ptr = next(_ptrs) if ptr is None else ptr

    def use(self):
        _stack[:] = [self]

    def __enter__(self):
        _stack.append(self)
        return self

    def __exit__(self, *exc):
        _stack.pop()


Stream.null = Stream(0)
_stack: list[Stream] = []


def get_current_stream() -> Stream:
    return _stack[-1] if _stack else Stream.null


cuda = types.SimpleNamespace(runtime=_Runtime, Stream=Stream, get_current_stream=get_current_stream)
