"""Backends behind one interface, chosen by name from a registry (imports are lazy)."""
from __future__ import annotations

import importlib
import importlib.util
import logging

from ..bundle import Bundle
from ..errors import BackendUnavailableError, ConfigError
from .base import Backend, BackendOptions

log = logging.getLogger(__name__)

#: name -> "module:Class"; the GPU issue adds "tensorrt".
REGISTRY: dict[str, str] = {
    "onnxruntime": "flare_rt.backends.onnxrt:OnnxRuntimeBackend",
    "torch": "flare_rt.backends.torch_backend:TorchBackend",
}
AUTO_ORDER = ("onnxruntime", "torch")


def _load(name: str):
    mod, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(mod), cls)


def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def resolve_device(device: str) -> str:
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device must be auto, cpu or cuda, got {device!r}")
    if device != "auto":
        return device
    try:
        from .onnxrt import cuda_available

        if cuda_available():
            return "cuda"
    except BackendUnavailableError:
        pass
    if _importable("torch"):
        import torch

        if torch.cuda.is_available():
            return "cuda"
    return "cpu"


def create_backend(bundle: Bundle, backend: str = "auto", device: str = "auto", threads: int | None = None) -> Backend:
    if backend != "auto" and backend not in REGISTRY:
        raise ConfigError(f"backend must be auto or one of {sorted(REGISTRY)}, got {backend!r}")
    if threads is not None and threads < 1:
        raise ConfigError(f"threads must be >= 1, got {threads}")
    options = BackendOptions(device=resolve_device(device), threads=threads)
    names = [backend] if backend != "auto" else [n for n in AUTO_ORDER if _importable(n)]
    errors = []
    for name in names:
        try:
            b = _load(name)(bundle, options)
            log.info("backend: %s", b.describe())
            return b
        except BackendUnavailableError as exc:
            if backend != "auto":
                raise
            errors.append(f"{name}: {exc}")
    raise BackendUnavailableError("no backend could run this bundle: " + "; ".join(errors or ["none installed"]))


__all__ = ["Backend", "BackendOptions", "REGISTRY", "create_backend", "resolve_device"]
