"""The GPU side of the runtime: importing CuPy (its kernel cache in flare-rt's cache folder), one memory
pool and one stream shared with PyTorch, timing without per-call syncs, and out-of-memory detection.

Nothing here imports CuPy or torch until a GPU path asks for it.
"""
from __future__ import annotations

import logging
import os
import time
import types

import numpy as np

from .errors import BackendUnavailableError

log = logging.getLogger(__name__)

CUPY_INSTALL = "pip install 'flare-rt[gpu]' (CuPy for your CUDA major, e.g. cupy-cuda12x or cupy-cuda13x)"


def import_cupy() -> types.ModuleType:
    """CuPy, with its on-disk kernel cache in ``$FLARE_RT_CACHE/cupy`` unless ``CUPY_CACHE_DIR`` is set (a fresh
    process then loads compiled kernels instead of compiling them again)."""
    if "CUPY_CACHE_DIR" not in os.environ:
        from .resources import cache_dir

        os.environ["CUPY_CACHE_DIR"] = str(cache_dir("cupy"))
    try:
        import cupy
    except ImportError as exc:
        raise BackendUnavailableError(f"the GPU pipeline needs CuPy ({exc}); {CUPY_INSTALL}") from exc
    return cupy


def use_pipeline_stream(cupy) -> None:
    """Make a non-blocking stream the current one where CuPy would use the legacy default stream (which
    TensorRT synchronises on with every other stream). With torch present the shared stream is torch's."""
    if cupy.cuda.get_current_stream().ptr == 0:
        cupy.cuda.Stream(non_blocking=True).use()


def is_device(xp: types.ModuleType) -> bool:
    return xp is not np


def synchronize(xp: types.ModuleType) -> None:
    """Wait for the device's queued work (no-op on the host)."""
    if hasattr(xp, "cuda"):
        xp.cuda.get_current_stream().synchronize()


class DeviceClock:
    """Sums the device time of repeated calls without a sync per call: CUDA events around each call,
    read once at the end (on the host: wall time)."""

    def __init__(self, xp: types.ModuleType):
        self._events = hasattr(xp, "cuda")
        self._xp = xp
        self._pairs: list = []
        self._host = 0.0
        self._t0 = 0.0
        self._start = None

    def start(self) -> None:
        if self._events:
            self._start = self._xp.cuda.Event()
            self._start.record()
        else:
            self._t0 = time.perf_counter()

    def stop(self) -> None:
        if self._events:
            end = self._xp.cuda.Event()
            end.record()
            self._pairs.append((self._start, end))
        else:
            self._host += time.perf_counter() - self._t0

    def seconds(self) -> float:
        """Total time of the measured calls (waits for the last event on a device)."""
        if not self._events:
            return self._host
        if self._pairs:
            self._pairs[-1][1].synchronize()
        return sum(self._xp.cuda.get_elapsed_time(a, b) for a, b in self._pairs) / 1000.0


def is_out_of_memory(exc: BaseException) -> bool:
    """An out-of-memory error of the GPU (torch's and CuPy's ``OutOfMemoryError``, a CUDA/cuDNN runtime error
    saying so) or of the host (``MemoryError``)."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def free_cached_memory(xp: types.ModuleType) -> None:
    """Give the memory pools' unused blocks back (before a retry with a smaller batch)."""
    if not hasattr(xp, "cuda"):
        return
    xp.get_default_memory_pool().free_all_blocks()
    try:
        import torch

        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def share_torch_pool_and_stream(cupy, torch) -> None:
    """Route CuPy's allocations through PyTorch's caching allocator and make torch's current stream CuPy's,
    so one pool holds both libraries' memory (counted once, reused across them) and their kernels run in
    order on one stream. Idempotent."""
    if getattr(share_torch_pool_and_stream, "done", False):
        return

    def allocate(size: int):
        device = cupy.cuda.Device().id
        if size == 0:  # every empty array (a nonzero() that finds nothing); a null pointer must name its device
            return cupy.cuda.MemoryPointer(cupy.cuda.UnownedMemory(0, 0, None, device), 0)
        stream = torch.cuda.current_stream(device)
        ptr = torch.cuda.caching_allocator_alloc(size, device, stream)
        mem = cupy.cuda.UnownedMemory(ptr, size, _TorchBlock(ptr, torch), device)
        return cupy.cuda.MemoryPointer(mem, 0)

    cupy.cuda.set_allocator(allocate)
    stream = cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream)
    stream.use()
    share_torch_pool_and_stream.done = True
    log.debug("CuPy allocates through PyTorch's caching allocator on torch's current stream")


class _TorchBlock:
    """Owner of a block from torch's caching allocator: gives it back when CuPy drops the memory."""

    def __init__(self, ptr: int, torch):
        self.ptr, self._torch = ptr, torch

    def __del__(self):
        try:
            self._torch.cuda.caching_allocator_delete(self.ptr)
        except Exception:  # noqa: BLE001 - interpreter shutdown: torch may already be gone
            pass
