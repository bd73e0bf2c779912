"""What the machine has: its CPU model, and is there a CUDA GPU? Asked of the NVIDIA driver itself (``libcuda``), so that ``--device auto``
on a machine without a GPU costs no torch or CuPy import and no CUDA context."""
from __future__ import annotations

import ctypes
import functools
import logging
import platform
import sys
from pathlib import Path

log = logging.getLogger(__name__)

_LIBCUDA = {"linux": ("libcuda.so.1", "libcuda.so"), "win32": ("nvcuda.dll",)}


@functools.lru_cache(maxsize=1)
def cuda_device_count() -> int:
    """Number of CUDA devices the driver reports (0 without a driver or a device). Does not create a context."""
    for name in _LIBCUDA.get(sys.platform, ()):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        try:
            if lib.cuInit(0) != 0:
                return 0
            count = ctypes.c_int(0)
            if lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
                return 0
            return int(count.value)
        except AttributeError:  # not the driver library
            continue
    return 0


def cpu_name() -> str:
    """The CPU model (``/proc/cpuinfo``'s model name; the platform's answer elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"
