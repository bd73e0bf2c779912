"""Helpers of the kernel tests (imported by name: `conftest` is ambiguous across test folders):
the CUDA build tools located on this machine, a command runner, NVRTC through ctypes."""
from __future__ import annotations

import ctypes
import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def wheel_dirs(sub: str) -> list[Path]:
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
    candidates += [str(d / name) for d in wheel_dirs("bin")]
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return Path(c)
    return None


def run(*cmd, cwd=None) -> str:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=cwd, check=False)
    if proc.returncode:
        command = " ".join(str(c) for c in cmd)
        raise AssertionError(f"{command} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
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

    def compile(self, source: str, options: tuple[str, ...],
                name: str = "flare_kernels.cu") -> tuple[int, str, bytes, bytes]:
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
