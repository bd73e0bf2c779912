"""Typed errors. Each message names the bad value, what was expected and how to fix it.

The CLI turns any :class:`FlareError` into one line on stderr and a non-zero exit code.
"""
from __future__ import annotations


class FlareError(Exception):
    """Base class of every error flare-rt raises on purpose."""

    exit_code = 1


class InputImageError(FlareError):
    """The input image is missing, unreadable or not a usable CT volume."""

    exit_code = 2


def truncated_error(path, got: int, nbytes: int) -> InputImageError:
    """An image file whose voxel data stop short of what its header promises."""
    return InputImageError(f"{path}: cannot read image: {max(got, 0)} bytes of voxel data where its header "
                           f"promises {nbytes} (truncated file?)")


class ModelError(FlareError):
    """A model bundle or nnU-Net model folder is missing, malformed or unsupported."""

    exit_code = 3


class BackendUnavailableError(FlareError):
    """The requested backend or device cannot be used on this machine."""

    exit_code = 4


class ExportVerificationError(FlareError):
    """An exported model disagrees with its PyTorch parent beyond the stated tolerances."""

    exit_code = 5


class ConfigError(FlareError):
    """An option has a value outside its valid range."""

    exit_code = 6


class ResourceError(FlareError):
    """Out of memory (GPU or host) even in the cheapest configuration."""

    exit_code = 7


class OutputError(FlareError):
    """An output cannot be written where it was asked for (permissions, a read-only or full file system)."""

    exit_code = 8


class EngineError(BackendUnavailableError):
    """A TensorRT engine cannot be built, found or loaded for this GPU, TensorRT version and bundle
    (a backend-unavailable error: ``--backend auto`` falls back to the next backend)."""
