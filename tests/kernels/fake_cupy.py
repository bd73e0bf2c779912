"""A test double of the few CuPy APIs the kernel loader and wrappers use: ``RawModule`` (from a path
or from source), ``cuda.Device``, the error types, the compiler's kernel-cache hook, and device
arrays (numpy underneath, typed as CuPy's so ``flare_rt.xp.array_module`` sees CuPy arrays).
It records what was loaded, compiled and launched, with the cache settings in force at that moment."""
from __future__ import annotations

import os
import re
import types
from dataclasses import dataclass, field

import numpy as np


class CUDADriverError(RuntimeError):
    pass


class CUDARuntimeError(RuntimeError):
    pass


class CompileException(Exception):
    pass


class DiskKernelCacheBackend:
    def __init__(self, cache_dir=None):
        if cache_dir is None:
            cache_dir = os.environ.get("CUPY_CACHE_DIR", "~/.cupy/kernel_cache")
        self.cache_dir = cache_dir


class FakeArray:
    """A device array: numpy data, CuPy's type name and attributes (shape, dtype, strides, flags, device)."""

    __module__ = "cupy_fake"

    def __init__(self, data: np.ndarray, device: int = 0):
        self.data = data
        self.device = types.SimpleNamespace(id=device)

    shape = property(lambda self: self.data.shape)
    dtype = property(lambda self: self.data.dtype)
    ndim = property(lambda self: self.data.ndim)
    size = property(lambda self: self.data.size)
    strides = property(lambda self: self.data.strides)
    itemsize = property(lambda self: self.data.itemsize)
    flags = property(lambda self: types.SimpleNamespace(c_contiguous=self.data.flags.c_contiguous))

    def __getitem__(self, key):
        return FakeArray(self.data[key], self.device.id)

    def get(self) -> np.ndarray:
        return self.data


@dataclass
class Launch:
    name: str
    grid: tuple
    block: tuple
    args: tuple


@dataclass
class Record:
    """What the double saw: modules made, functions looked up (with the cache settings then), launches."""

    modules: list = field(default_factory=list)
    lookups: list = field(default_factory=list)
    launches: list = field(default_factory=list)


class FakeKernel:
    def __init__(self, name: str, record: Record):
        self.name, self.record = name, record

    def __call__(self, grid, block, args, **kwargs):
        self.record.launches.append(Launch(self.name, tuple(grid), tuple(block), tuple(args)))


def source_entry_points(source: str) -> set[str]:
    return set(re.findall(r'extern "C" __global__ void (\w+)\(', source))


class FakeRawModule:
    def __init__(self, cp: FakeCupy, code=None, *, path=None, options=()):
        assert (code is None) != (path is None), "RawModule takes code or path"
        self.cp, self.code, self.path, self.options = cp, code, path, tuple(options)
        cp.record.modules.append(self)

    def get_function(self, name: str) -> FakeKernel:
        cp = self.cp
        compiler = cp.cuda.compiler
        backend = getattr(compiler, "_kernel_cache_backend", None)
        cp.record.lookups.append((self, name, os.environ.get("CUPY_CACHE_DIR"),
                                  backend.cache_dir if backend is not None else None))
        if self.path is not None:
            if cp.refuse_fatbin:
                raise CUDADriverError("CUDA_ERROR_NO_BINARY_FOR_GPU: no kernel image is available")
            with open(self.path, "rb") as f:
                f.read(16)
            names = cp.fatbin_entries
        else:
            if cp.compile_error:
                raise CompileException("error: identifier 'x' is undefined")
            names = source_entry_points(self.code)
        if name not in names:
            raise CUDADriverError(f"CUDA_ERROR_NOT_FOUND: named symbol not found: {name}")
        return FakeKernel(name, cp.record)


def make_compiler(modern: bool = True) -> types.ModuleType:
    """cupy.cuda.compiler: CuPy >= 14 keeps a cache backend object; older CuPy only reads the env."""
    compiler = types.ModuleType("cupy_fake.cuda.compiler")
    compiler.CompileException = CompileException
    if modern:
        compiler._DiskKernelCacheBackend = DiskKernelCacheBackend
        compiler._kernel_cache_backend = DiskKernelCacheBackend("/home/user/.cupy/kernel_cache")

        def _set_kernel_cache_backend(backend):
            compiler._kernel_cache_backend = backend

        compiler._set_kernel_cache_backend = _set_kernel_cache_backend
    return compiler


class FakeCupy(types.ModuleType):
    """``import cupy`` as far as flare_rt.kernels uses it."""

    uint8 = np.uint8
    int32 = np.int32
    float32 = np.float32

    def __init__(self, cc: str = "86", device: int = 0, refuse_fatbin: bool = False, compile_error: bool = False,
                 modern_compiler: bool = True, fatbin_entries: set[str] | None = None, no_device: bool = False):
        super().__init__("cupy")
        self.cc, self.device_id, self.no_device = cc, device, no_device
        self.refuse_fatbin, self.compile_error = refuse_fatbin, compile_error
        self.fatbin_entries = fatbin_entries or set()
        self.record = Record()
        fake = self

        class Device:
            def __init__(self, i=None):
                if fake.no_device:
                    raise CUDARuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected")
                self.id = fake.device_id if i is None else i

            @property
            def compute_capability(self):
                return fake.cc

        self.cuda = types.SimpleNamespace(Device=Device, compiler=make_compiler(modern_compiler),
                                          driver=types.SimpleNamespace(CUDADriverError=CUDADriverError),
                                          runtime=types.SimpleNamespace(CUDARuntimeError=CUDARuntimeError))

    def RawModule(self, code=None, *, path=None, options=()):
        return FakeRawModule(self, code, path=path, options=options)

    def asarray(self, a, dtype=None):
        return a if isinstance(a, FakeArray) else FakeArray(np.array(a, dtype=dtype), self.device_id)

    def empty(self, shape, dtype=np.float32):
        return FakeArray(np.empty(shape, dtype=dtype), self.device_id)
