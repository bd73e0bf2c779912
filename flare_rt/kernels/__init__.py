"""Native CUDA kernels of the GPU pipeline (see README.md beside this file).

``labels_from_logits`` (fused bilinear resize + argmax on the way back) and ``accumulate_tiles``
(Gaussian-weighted tile scatter into the blend buffer) take CuPy arrays and run on CuPy's current
stream. The module is loaded on first use (prebuilt fatbin, else NVRTC); importing this package
imports no CuPy.
"""
import os

from .loader import KernelModule, KernelUnavailableError, load_kernels
from .ops import KernelArgumentError, accumulate_tiles, labels_from_logits

#: ``1`` makes the pipeline's CuPy path use the kernels; off by default until the GPU benchmark
#: (``bench/kernels.py``, ``bench/gpu_check.sh``) has shown them faster with the same results.
NATIVE_ENV = "FLARE_RT_NATIVE_KERNELS"


def native_enabled(xp) -> bool:
    """Whether the pipeline uses the native kernels for arrays of ``xp`` (CuPy only, when enabled)."""
    return getattr(xp, "__name__", "") == "cupy" and os.environ.get(NATIVE_ENV, "0") == "1"


__all__ = ["KernelArgumentError", "KernelModule", "KernelUnavailableError", "NATIVE_ENV", "accumulate_tiles",
           "labels_from_logits", "load_kernels", "native_enabled"]
