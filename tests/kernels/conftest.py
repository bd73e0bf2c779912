"""Fixtures of the kernel tests: the CUDA build tools (nvcc, cuobjdump, NVRTC, cmake) located on
this machine, and a CuPy device for the GPU tests.

The build tools are required, not optional: CI compiles the kernels on a CPU machine. nvcc comes
with the machine (/usr/local/cuda) or the `nvidia-cuda-nvcc` wheel, cuobjdump and NVRTC with the
`nvidia-cuda-cuobjdump` and `nvidia-cuda-nvrtc` wheels of the dev extra. A missing tool fails the
test with the way to install it; only the GPU tests skip (without CuPy and a CUDA device)."""
from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
from pathlib import Path

import pytest

from kernel_tools import Nvrtc, find_tool, wheel_dirs


def _require(name: str, env: str | None, install: str) -> Path:
    path = find_tool(name, env)
    if path is None:
        pytest.fail(f"{name} not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin, the nvidia-* wheels): {install}")
    return path


@pytest.fixture(scope="session")
def nvcc() -> Path:
    return _require("nvcc", "CUDACXX", "install the CUDA toolkit or `pip install nvidia-cuda-nvcc`")


@pytest.fixture(scope="session")
def cuobjdump() -> Path:
    return _require("cuobjdump", None, "`pip install nvidia-cuda-cuobjdump` (in the dev extra)")


@pytest.fixture(scope="session")
def cmake() -> Path:
    return _require("cmake", None, "install cmake >= 3.25 (apt-get install cmake, or `pip install cmake`)")


@pytest.fixture(scope="session")
def nvrtc() -> Nvrtc:
    for lib_dir in wheel_dirs("lib"):
        for lib in sorted(lib_dir.glob("libnvrtc.so.*"), reverse=True):
            for builtins in lib_dir.glob("libnvrtc-builtins.so.*"):
                if ".alt." not in builtins.name:
                    ctypes.CDLL(str(builtins), mode=ctypes.RTLD_GLOBAL)  # found by name, not by rpath
            return Nvrtc(ctypes.CDLL(str(lib)))
    path = ctypes.util.find_library("nvrtc")
    if path:
        return Nvrtc(ctypes.CDLL(path))
    pytest.fail("NVRTC (libnvrtc.so) not found: `pip install nvidia-cuda-nvrtc` (in the dev extra)")


@pytest.fixture(scope="session")
def cupy_device():
    """CuPy on a CUDA device, or a skip (the GPU tests' only reason to skip)."""
    if importlib.util.find_spec("cupy") is None:
        pytest.skip("CuPy is not installed (GPU tests need CuPy and a CUDA device)")
    import cupy

    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except cupy.cuda.runtime.CUDARuntimeError as exc:
        pytest.skip(f"no usable CUDA device ({exc})")
    if n == 0:
        pytest.skip("no CUDA device")
    return cupy
