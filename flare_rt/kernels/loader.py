"""Loading the native kernels: the prebuilt fatbin where it holds code for the GPU, else the same
source compiled at run time by NVRTC (through CuPy) into the flare-rt cache folder.

The choice is a pure function (:func:`choose`) of the device's compute capability, the fatbin's
manifest and the source's hash, so it is tested without a GPU; :func:`load_kernels` applies it with
CuPy (imported lazily) and logs which way the kernels came.

- A cubin runs on its own major architecture at the same or a higher minor version (sm_80 code runs
  on 8.6 and 8.7); PTX is compiled by the driver for any newer GPU. Both count as "the fatbin holds
  the device's architecture".
- A fatbin that does not match the source beside it (edited without a rebuild), a missing one, or
  one the driver refuses (cubins from CUDA 13 need an R580+ driver) falls back to NVRTC, with a
  warning; ``FLARE_RT_KERNELS=prebuilt`` makes those cases errors, ``=nvrtc`` skips the fatbin.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..errors import BackendUnavailableError, ConfigError
from ..resources import cache_dir

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent
SOURCE_NAME = "flare_kernels.cu"
FATBIN_NAME = "flare_kernels.fatbin"
MANIFEST_NAME = "flare_kernels.json"
#: The kernels' extern "C" entry points (all of them are looked up at load time).
ENTRY_POINTS = ("labels_from_logits_f32", "labels_from_logits_f16", "accumulate_tiles_f32", "accumulate_tiles_f16")
#: NVRTC options (CuPy adds -ftz=true, which the source's explicit IEEE instructions ignore).
NVRTC_OPTIONS = ("-std=c++17",)
MODE_ENV = "FLARE_RT_KERNELS"
MODES = ("auto", "prebuilt", "nvrtc")
REBUILD_HINT = "rebuild with `cmake -S . -B build && cmake --build build` in a source checkout"


class KernelUnavailableError(BackendUnavailableError):
    """The native kernels cannot be loaded on this machine (no CuPy or GPU, or no usable code)."""


@dataclass(frozen=True)
class Manifest:
    """``flare_kernels.json``: what the committed fatbin was built from and holds."""

    source_sha256: str
    fatbin_sha256: str
    sass: tuple[int, ...]  # compute capabilities with a cubin (75 = sm_75)
    ptx: tuple[int, ...]  # compute capabilities with PTX
    nvcc: str

    @classmethod
    def read(cls, path: Path) -> Manifest | None:
        """The manifest at ``path``; None (with a warning) when it is missing or unreadable."""
        try:
            d = json.loads(path.read_text())
            return cls(str(d["source_sha256"]), str(d["fatbin_sha256"]), tuple(int(a) for a in d["sass"]),
                       tuple(int(a) for a in d["ptx"]), str(d["nvcc"]))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("kernel manifest %s is unreadable (%s); %s", path, exc, REBUILD_HINT)
            return None


@dataclass(frozen=True)
class Package:
    """Where the kernel files are (the package folder; tests point it elsewhere)."""

    folder: Path = PACKAGE_DIR

    @property
    def source(self) -> Path:
        return self.folder / SOURCE_NAME

    @property
    def fatbin(self) -> Path:
        return self.folder / FATBIN_NAME

    @property
    def manifest(self) -> Path:
        return self.folder / MANIFEST_NAME


def sha256_of(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


@dataclass(frozen=True)
class Choice:
    how: str  # "prebuilt" or "nvrtc"
    detail: str  # which code of the fatbin is used, or why NVRTC compiles


def choose(cc: int, manifest: Manifest | None, source_sha256: str, fatbin_sha256: str | None,
           mode: str = "auto") -> Choice:
    """Prebuilt fatbin or NVRTC for a device of compute capability ``cc`` (86 for 8.6)."""
    if mode not in MODES:
        raise ConfigError(f"${MODE_ENV}={mode!r} is not one of {', '.join(MODES)}; unset it for 'auto'")
    if mode == "nvrtc":
        return Choice("nvrtc", f"${MODE_ENV}=nvrtc")
    problem = None
    if manifest is None:
        problem = f"no {MANIFEST_NAME} beside the fatbin"
    elif fatbin_sha256 is None:
        problem = f"{FATBIN_NAME} is missing"
    elif manifest.source_sha256 != source_sha256:
        problem = f"{FATBIN_NAME} is stale (built from another version of {SOURCE_NAME}; {REBUILD_HINT})"
    elif manifest.fatbin_sha256 != fatbin_sha256:
        problem = f"{FATBIN_NAME} does not match its manifest (a partial copy?; {REBUILD_HINT})"
    else:
        same_major = [a for a in manifest.sass if a // 10 == cc // 10 and a <= cc]
        if same_major:
            return Choice("prebuilt", f"sm_{max(same_major)} cubin (nvcc {manifest.nvcc})")
        older_ptx = [a for a in manifest.ptx if a <= cc]
        if older_ptx:
            return Choice("prebuilt", f"compute_{max(older_ptx)} PTX compiled by the driver for sm_{cc} "
                                      f"(nvcc {manifest.nvcc})")
        cubins = ", ".join(f"sm_{a}" for a in manifest.sass)
        ptx = ", ".join(f"compute_{a}" for a in manifest.ptx)
        problem = f"{FATBIN_NAME} holds no code for sm_{cc} (cubins: {cubins}; PTX: {ptx})"
    if mode == "prebuilt":
        raise KernelUnavailableError(f"${MODE_ENV}=prebuilt but {problem}; unset it to compile with NVRTC")
    return Choice("nvrtc", problem)


@dataclass(frozen=True)
class KernelModule:
    """The loaded entry points (CuPy ``RawKernel`` objects by name) and how they were obtained."""

    functions: dict
    choice: Choice
    cc: int

    def __getitem__(self, name: str):
        return self.functions[name]

    def describe(self) -> str:
        how = "prebuilt fatbin" if self.choice.how == "prebuilt" else "compiled by NVRTC"
        return f"flare-rt CUDA kernels for sm_{self.cc}: {how}, {self.choice.detail}"


@contextmanager
def cupy_cache_dir(cp, path: Path) -> Iterator[None]:
    """Point CuPy's on-disk kernel cache at ``path`` while compiling. CuPy < 14 reads $CUPY_CACHE_DIR
    at each compile; CuPy >= 14 reads it once at import into a cache backend, which is swapped here
    (a private hook, used only when present). Both are restored on exit."""
    compiler = cp.cuda.compiler
    old_env = os.environ.get("CUPY_CACHE_DIR")
    old_backend = getattr(compiler, "_kernel_cache_backend", None)
    disk = getattr(compiler, "_DiskKernelCacheBackend", None)
    swap = (old_backend is not None and disk is not None and type(old_backend) is disk
            and hasattr(compiler, "_set_kernel_cache_backend"))
    os.environ["CUPY_CACHE_DIR"] = str(path)
    if swap:
        compiler._set_kernel_cache_backend(disk(str(path)))
    try:
        yield
    finally:
        if swap:
            compiler._set_kernel_cache_backend(old_backend)
        if old_env is None:
            os.environ.pop("CUPY_CACHE_DIR", None)
        else:
            os.environ["CUPY_CACHE_DIR"] = old_env


def _functions(module) -> dict:
    """Look every entry point up (this is when CuPy loads or compiles the module)."""
    return {name: module.get_function(name) for name in ENTRY_POINTS}


def load_module(cp, cc: int, mode: str = "auto", package: Package = Package()) -> KernelModule:
    """Load the kernels for the current device (compute capability ``cc``) with CuPy module ``cp``."""
    source = package.source.read_text()
    choice = choose(cc, Manifest.read(package.manifest), hashlib.sha256(source.encode()).hexdigest(),
                    sha256_of(package.fatbin), mode)
    if choice.how == "prebuilt":
        try:
            kernels = KernelModule(_functions(cp.RawModule(path=str(package.fatbin))), choice, cc)
            log.info("%s", kernels.describe())
            return kernels
        except cp.cuda.driver.CUDADriverError as exc:
            if mode == "prebuilt":
                raise KernelUnavailableError(f"{package.fatbin} does not load on this GPU/driver ({exc}); "
                                             f"unset ${MODE_ENV} to compile with NVRTC") from exc
            choice = Choice("nvrtc", f"the driver refused {FATBIN_NAME} ({exc})")
    log.warning("flare-rt CUDA kernels: compiling %s with NVRTC for sm_%d: %s", SOURCE_NAME, cc, choice.detail)
    cache = cache_dir("kernels")
    try:
        with cupy_cache_dir(cp, cache):
            functions = _functions(cp.RawModule(code=source, options=NVRTC_OPTIONS))
    except cp.cuda.compiler.CompileException as exc:
        raise KernelUnavailableError(f"NVRTC could not compile {package.source} for sm_{cc}: {exc}") from exc
    kernels = KernelModule(functions, Choice("nvrtc", f"{choice.detail}; cached in {cache}"), cc)
    log.info("%s", kernels.describe())
    return kernels


_lock = threading.Lock()
_loaded: dict[int, KernelModule] = {}


def import_cupy():
    from ..gpu import import_cupy as _import

    try:
        return _import()
    except BackendUnavailableError as exc:
        raise KernelUnavailableError(f"the CUDA kernels need CuPy: {exc}") from exc


def load_kernels(cp=None) -> KernelModule:
    """The kernels for CuPy's current device, loaded once per device and process."""
    cp = cp or import_cupy()
    try:
        device = cp.cuda.Device()
        key, cc = device.id, int(device.compute_capability)
    except cp.cuda.runtime.CUDARuntimeError as exc:
        raise KernelUnavailableError(f"the CUDA kernels need a usable CUDA device ({exc})") from exc
    with _lock:
        if key not in _loaded:
            _loaded[key] = load_module(cp, cc, os.environ.get(MODE_ENV, "auto").strip().lower())
        return _loaded[key]
