"""What the TensorRT path needs from its environment: TensorRT and CuPy (imported lazily, with an error
that says how to install them), the identity of the current GPU, and a logger that forwards
TensorRT's messages to :mod:`logging` and keeps its errors for the one-line error we raise."""
from __future__ import annotations

import logging
import platform
import re
import sys
from dataclasses import dataclass

from ..errors import BackendUnavailableError

log = logging.getLogger(__name__)

#: TensorRT majors flare-rt builds with: 10.x (strong typing opt-in) and 11.x (strong typing only).
SUPPORTED_MAJORS = (10, 11)
INSTALL_HINT = ("pip install 'flare-rt[tensorrt]' (NVIDIA's tensorrt-cu12 wheels); to segment without it: "
                "--backend torch or onnxruntime")


def load_tensorrt():
    """The ``tensorrt`` module, or :class:`BackendUnavailableError` saying why not."""
    try:
        import tensorrt as trt
    except (ImportError, OSError) as exc:  # OSError: the wheel is there, its libnvinfer is not
        raise BackendUnavailableError(f"TensorRT is not installed ({exc}); {INSTALL_HINT}") from exc
    version = str(getattr(trt, "__version__", "0"))
    if tensorrt_major(version) not in SUPPORTED_MAJORS:
        raise BackendUnavailableError(f"TensorRT {version} is not supported: flare-rt builds engines with TensorRT "
                                      f"{' or '.join(f'{m}.x' for m in SUPPORTED_MAJORS)}; {INSTALL_HINT}")
    return trt


def tensorrt_major(version: str) -> int:
    m = re.match(r"(\d+)\.", version)
    return int(m.group(1)) if m else 0


@dataclass(frozen=True)
class GpuInfo:
    """The GPU an engine is built for: TensorRT engines run only on the GPU model they were built on."""

    name: str  # e.g. "Quadro RTX 5000"
    compute_capability: str  # e.g. "7.5"

    @property
    def sm(self) -> str:
        return "sm_" + self.compute_capability.replace(".", "")

    def describe(self) -> str:
        return f"{self.name} ({self.sm})"


def current_gpu(cp) -> GpuInfo:
    """The current CUDA device, or :class:`BackendUnavailableError` when there is none."""
    rt = cp.cuda.runtime
    try:
        count = rt.getDeviceCount()
        props = rt.getDeviceProperties(rt.getDevice()) if count else None
    except (rt.CUDARuntimeError, RuntimeError, OSError) as exc:
        raise BackendUnavailableError(f"no usable CUDA GPU ({exc}); the tensorrt backend needs an NVIDIA GPU and "
                                      "driver; use --device cpu") from exc
    if not props:
        raise BackendUnavailableError("no CUDA GPU found; the tensorrt backend needs an NVIDIA GPU; use --device cpu")
    name = props["name"]
    name = name.decode(errors="replace") if isinstance(name, bytes) else str(name)
    return GpuInfo(name.strip("\x00 "), f"{props['major']}.{props['minor']}")


def host_platform() -> str:
    """Engines are not portable across operating systems or CPU architectures."""
    return f"{sys.platform}-{platform.machine()}"


def make_logger(trt):
    """A ``trt.ILogger`` forwarding to :mod:`logging` (TensorRT's INFO as DEBUG); ``.errors`` keeps the
    error messages (and ``.warnings`` the warnings) so a failed build, deserialisation or start can say
    why in one line."""
    sev = trt.ILogger.Severity
    levels = {sev.INTERNAL_ERROR: logging.ERROR, sev.ERROR: logging.ERROR, sev.WARNING: logging.WARNING,
              sev.INFO: logging.DEBUG, sev.VERBOSE: logging.DEBUG - 1}

    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []
            self.warnings: list[str] = []

        def log(self, severity, msg):
            level = levels.get(severity, logging.DEBUG)
            if level >= logging.ERROR:
                self.errors.append(str(msg))
                level = logging.DEBUG  # raised as our own one-line error; logged in full with -v
            elif level == logging.WARNING:
                self.warnings.append(str(msg))
            log.log(level, "TensorRT: %s", msg)

        def last_error(self, default: str = "no message from TensorRT") -> str:
            """TensorRT's last error, else its last warning (it reports a failed CUDA initialisation as
            one), else ``default``."""
            if self.errors:
                return self.errors[-1]
            return f"warning: {self.warnings[-1]}" if self.warnings else default

    return Logger()


def create(factory, *args, logger, what: str):
    """``trt.Builder(logger)``, ``trt.Runtime(logger)``, ``trt.OnnxParser(network, logger)``.

    When TensorRT cannot start (CUDA initialisation failed: a driver older than TensorRT's CUDA, a GPU
    the container cannot see) it logs why and returns no object, which its Python bindings raise as
    ``TypeError: pybind11::init(): factory function returned nullptr``. That makes the backend unavailable
    (:class:`BackendUnavailableError` with TensorRT's message, so ``--backend auto`` falls back); it is not an
    :class:`~flare_rt.errors.EngineError`: no engine is at fault, and none is rebuilt or removed for it."""
    try:
        made = factory(*args)
    except TypeError as exc:
        if "nullptr" not in str(exc):
            raise
        made = None
    if made is None:
        raise BackendUnavailableError(f"TensorRT could not create its {what} ({logger.last_error()}); check that the "
                                      "GPU is visible (nvidia-smi; docker run --gpus) and that its driver supports "
                                      "TensorRT's CUDA")
    return made
