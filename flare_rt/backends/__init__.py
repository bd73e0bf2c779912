"""Backends behind one interface, chosen by name from a registry (imports are lazy)."""
from __future__ import annotations

import importlib
import importlib.util
import logging

from ..bundle import Bundle
from ..errors import BackendUnavailableError, ConfigError
from .base import Backend, BackendOptions

log = logging.getLogger(__name__)

#: name -> "module:Class".
REGISTRY: dict[str, str] = {
    "tensorrt": "flare_rt.backends.tensorrt:TensorRTBackend",
    "onnxruntime": "flare_rt.backends.onnxrt:OnnxRuntimeBackend",
    "torch": "flare_rt.backends.torch_backend:TorchBackend",
    "openvino": "flare_rt.backends.openvino:OpenVinoBackend",
}
#: ``--backend auto``: the backends tried, in order, per device (the first that loads is used).
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cuda": ("tensorrt", "torch", "onnxruntime"),
    "cpu": ("onnxruntime", "torch"),
}
#: Tried under auto even when not installed, so that the log says why the fast path was not taken.
ALWAYS_TRIED = frozenset({"tensorrt"})
DEVICES = ("auto", "cpu", "cuda")


def _load(name: str):
    mod, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(mod), cls)


def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def check_backend_name(backend: str, option: str = "backend") -> str:
    """``backend`` if it is ``auto`` or a registered backend; :class:`ConfigError` naming ``option`` otherwise."""
    if backend != "auto" and backend not in REGISTRY:
        raise ConfigError(f"{option} must be auto or one of {sorted(REGISTRY)}, got {backend!r}")
    return backend


def check_device(device: str, option: str = "device") -> str:
    """``device`` if it is one of :data:`DEVICES`; :class:`ConfigError` naming ``option`` otherwise."""
    if device not in DEVICES:
        raise ConfigError(f"{option} must be one of {', '.join(DEVICES)}, got {device!r}")
    return device


def resolve_device(device: str) -> str:
    """``auto`` → ``cuda`` where the NVIDIA driver reports a GPU, else ``cpu`` (no torch/CuPy import)."""
    if check_device(device) != "auto":
        return device
    from ..devices import cuda_device_count

    return "cuda" if cuda_device_count() > 0 else "cpu"


def candidates(backend: str, device: str) -> list[tuple[str, str]]:
    """The (backend, device) pairs to try, in order. ``auto`` device on a GPU machine falls back to the
    CPU when no GPU backend is installed."""
    devices = [resolve_device(device)]
    if device == "auto" and devices[0] == "cuda":
        devices.append("cpu")
    if backend != "auto":
        return [(backend, d) for d in devices]
    return [(b, d) for d in devices for b in AUTO_ORDER[d] if b in ALWAYS_TRIED or _importable(b)]


def create_backend(bundle: Bundle, backend: str = "auto", device: str = "auto", threads: int | None = None,
                   batch_size: int = 1, cuda_graphs: bool = False) -> Backend:
    check_backend_name(backend)
    if threads is not None and threads < 1:
        raise ConfigError(f"threads must be >= 1, got {threads}")
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    pairs = [(n, d, None) for n, d in candidates(backend, device)]
    if backend == "auto" and any(d == "cpu" for _, d, _ in pairs):  # flare_rt.precision.choose_cpu decides
        from .select import auto_cpu

        pairs = [p for p in pairs if p[1] != "cpu"] + auto_cpu(bundle, _importable)
    errors = []
    for i, (name, dev, compute) in enumerate(pairs):
        try:
            b = _load(name)(bundle, BackendOptions(device=dev, threads=threads, precision=compute,
                                                   batch_size=batch_size, cuda_graphs=cuda_graphs))
        except BackendUnavailableError as exc:
            if backend != "auto" and i == len(pairs) - 1:
                raise
            errors.append(f"{name} on {dev}: {exc}")
            continue
        if errors:
            log.info("backend %s (not usable: %s)", b.describe(), "; ".join(errors))
        else:
            log.info("backend: %s", b.describe())
        return b
    raise BackendUnavailableError("no backend could run this bundle: " + "; ".join(errors or ["none installed"]))


__all__ = ["Backend", "BackendOptions", "REGISTRY", "create_backend", "resolve_device"]
