"""Backends behind one interface, chosen by name from a registry (imports are lazy)."""
from __future__ import annotations

import importlib
import importlib.util
import logging
from dataclasses import replace

from ..bundle import Bundle
from ..errors import BackendUnavailableError, ConfigError
from .base import Backend, BackendOptions

log = logging.getLogger(__name__)

#: name -> "module:Class".
REGISTRY: dict[str, str] = {
    "tensorrt": "flare_rt.backends.tensorrt:TensorRTBackend",
    "onnxruntime": "flare_rt.backends.onnxrt:OnnxRuntimeBackend",
    "torch": "flare_rt.backends.torch_backend:TorchBackend",
}
AUTO_ORDER = ("tensorrt", "onnxruntime", "torch")
#: Tried under auto only when the device resolves to cuda, and then always (installed or not), so
#: that a GPU machine without TensorRT says why it falls back.
GPU_ONLY = frozenset({"tensorrt"})


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
    if _importable("cupy"):
        from ..trt.runtime import current_gpu, load_cupy

        try:
            current_gpu(load_cupy())
            return "cuda"
        except BackendUnavailableError:
            pass
    if _importable("torch"):
        import torch

        if torch.cuda.is_available():
            return "cuda"
    return "cpu"


def create_backend(bundle: Bundle, backend: str = "auto", device: str = "auto", threads: int | None = None,
                   batch_size: int = 1) -> Backend:
    if backend != "auto" and backend not in REGISTRY:
        raise ConfigError(f"backend must be auto or one of {sorted(REGISTRY)}, got {backend!r}")
    if threads is not None and threads < 1:
        raise ConfigError(f"threads must be >= 1, got {threads}")
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    options = BackendOptions(device=resolve_device(device), threads=threads, batch_size=batch_size)
    if backend != "auto":
        tries = [(backend, options)]
    else:
        tries = [(n, options) for n in AUTO_ORDER if (options.device == "cuda" if n in GPU_ONLY else _importable(n))]
        if device == "auto" and options.device == "cuda":  # no GPU backend works: the CPU still segments
            cpu = replace(options, device="cpu")
            tries += [(n, cpu) for n in AUTO_ORDER if n not in GPU_ONLY and _importable(n)]
    errors = []
    for i, (name, opts) in enumerate(tries):
        try:
            b = _load(name)(bundle, opts)
            log.info("backend: %s", b.describe())
            return b
        except BackendUnavailableError as exc:
            if backend != "auto":
                raise
            errors.append(f"{name} on {opts.device}: {exc}")
            if i + 1 < len(tries):
                nxt, nxt_opts = tries[i + 1]
                log.warning("backend %s on %s unavailable (%s); falling back to %s on %s", name, opts.device, exc,
                            nxt, nxt_opts.device)
    raise BackendUnavailableError("no backend could run this bundle: " + "; ".join(errors or ["none installed"]))


__all__ = ["Backend", "BackendOptions", "REGISTRY", "create_backend", "resolve_device"]
