"""Native CUDA kernels of the GPU pipeline (see README.md beside this file).

``labels_from_logits`` (fused bilinear resize + argmax on the way back) and ``accumulate_tiles``
(Gaussian-weighted tile scatter into the blend buffer) take CuPy arrays and run on CuPy's current
stream. The module is loaded on first use (prebuilt fatbin, else NVRTC); importing this package
imports no CuPy.
"""
from .loader import KernelModule, KernelUnavailableError, load_kernels
from .ops import KernelArgumentError, accumulate_tiles, labels_from_logits

__all__ = ["KernelArgumentError", "KernelModule", "KernelUnavailableError", "accumulate_tiles", "labels_from_logits",
           "load_kernels"]
