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
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _wheel_dirs(sub: str) -> list[Path]:
    """<site-packages>/nvidia/*/<sub> of the NVIDIA CUDA wheels (cu13/bin, cuda_nvcc/bin, ...)."""
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    return sorted((p for loc in spec.submodule_search_locations for p in Path(loc).glob(f"*/{sub}")), reverse=True)


def find_tool(name: str, env: str | None = None) -> Path | None:
    candidates = [os.environ.get(env)] if env else []
    candidates.append(shutil.which(name))
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(str(Path(os.environ[var]) / "bin" / name))
    candidates.append(f"/usr/local/cuda/bin/{name}")
    candidates += [str(d / name) for d in _wheel_dirs("bin")]
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return Path(c)
    return None


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


def run(*cmd, cwd=None) -> str:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=cwd, check=False)
    if proc.returncode:
        raise AssertionError(f"{' '.join(str(c) for c in cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


class Nvrtc:
    """NVRTC through ctypes: the library CuPy compiles with at run time, no GPU needed."""

    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib

    def _check(self, rc: int, what: str) -> None:
        if rc:
            self.lib.nvrtcGetErrorString.restype = ctypes.c_char_p
            raise AssertionError(f"{what}: {self.lib.nvrtcGetErrorString(rc).decode()}")

    def version(self) -> tuple[int, int]:
        major, minor = ctypes.c_int(), ctypes.c_int()
        self._check(self.lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
        return major.value, minor.value

    def compile(self, source: str, options: tuple[str, ...], name: str = "flare_kernels.cu") -> tuple[int, str, bytes, bytes]:
        """(status, log, ptx, cubin); cubin is empty when compiling for a virtual architecture."""
        prog = ctypes.c_void_p()
        self._check(self.lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0, None, None),
                    "nvrtcCreateProgram")
        try:
            opts = (ctypes.c_char_p * len(options))(*(o.encode() for o in options))
            status = self.lib.nvrtcCompileProgram(prog, len(options), opts)
            size = ctypes.c_size_t()
            self.lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            self.lib.nvrtcGetProgramLog(prog, log)
            if status:
                return status, log.value.decode(errors="replace"), b"", b""
            self.lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
            ptx = ctypes.create_string_buffer(size.value)
            self._check(self.lib.nvrtcGetPTX(prog, ptx), "nvrtcGetPTX")
            cubin = b""
            if any(o.startswith("--gpu-architecture=sm_") for o in options):
                self.lib.nvrtcGetCUBINSize(prog, ctypes.byref(size))
                buf = ctypes.create_string_buffer(size.value)
                self._check(self.lib.nvrtcGetCUBIN(prog, buf), "nvrtcGetCUBIN")
                cubin = buf.raw
            return 0, log.value.decode(errors="replace"), ptx.value, cubin
        finally:
            self.lib.nvrtcDestroyProgram(ctypes.byref(prog))


@pytest.fixture(scope="session")
def nvrtc() -> Nvrtc:
    for lib_dir in _wheel_dirs("lib"):
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
