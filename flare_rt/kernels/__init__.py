"""Native CUDA kernels of the GPU pipeline (see README.md beside this file).

``labels_from_logits`` (fused bilinear resize + argmax on the way back) and ``accumulate_tiles``
(Gaussian-weighted tile scatter into the blend buffer) take CuPy arrays and run on CuPy's current
stream. The module is loaded on first use (prebuilt fatbin, else NVRTC); importing this package
imports no CuPy.
"""
import logging
import os
import threading

from .loader import KernelModule, KernelUnavailableError, load_kernels
from .ops import KernelArgumentError, accumulate_tiles, labels_from_logits

log = logging.getLogger(__name__)

#: ``0`` makes the pipeline's CuPy path use the library calls instead of the kernels. On by default since the
#: GPU benchmark (``bench/kernels.py`` in ``bench/gpu_check.sh``, H200, ts269) measured them faster with the
#: same results: labels 27.8x, tile accumulation 2.7x, and no temporaries (the library path's 93-406 MiB).
NATIVE_ENV = "FLARE_RT_NATIVE_KERNELS"

_usable: dict[int, bool] = {}
_usable_lock = threading.Lock()


def native_enabled(xp) -> bool:
    """Whether the pipeline uses the native kernels for arrays of ``xp``: CuPy only, unless
    ``FLARE_RT_NATIVE_KERNELS=0``, and only where the module loads on the current device (else one warning
    naming why, and the library path runs)."""
    if getattr(xp, "__name__", "") != "cupy" or os.environ.get(NATIVE_ENV, "1").strip() == "0":
        return False
    device = xp.cuda.Device().id
    with _usable_lock:
        if device not in _usable:
            try:
                load_kernels(xp)
                _usable[device] = True
            except KernelUnavailableError as exc:
                log.warning("native CUDA kernels not usable on GPU %d (%s): the library path runs instead "
                            "(%s=0 silences this)", device, exc, NATIVE_ENV)
                _usable[device] = False
        return _usable[device]


__all__ = ["KernelArgumentError", "KernelModule", "KernelUnavailableError", "NATIVE_ENV", "accumulate_tiles",
           "labels_from_logits", "load_kernels", "native_enabled"]
