"""The backend interface: a batch of patches in, logits out, on the same device, as arrays of the
pipeline's array module (numpy on the CPU; CuPy on the GPU, exchanged with torch through DLPack)."""
from __future__ import annotations

import abc
from dataclasses import dataclass

import numpy as np

from ..bundle import Bundle


@dataclass(frozen=True)
class BackendOptions:
    device: str = "cpu"  # "cpu" or "cuda" (resolved from "auto" by the registry)
    threads: int | None = None  # intra-op CPU threads; None: the runtime's default
    precision: str | None = None  # compute precision; None: the backend's default for the device
    cuda_graphs: bool = True  # replay the fixed-shape forward as a CUDA graph where the backend can


class Backend(abc.ABC):
    """Runs a bundle's network: ``backend(batch)`` with batch (B, C, *patch) float32 → (B, K, *patch) float32."""

    name: str = "?"

    def __init__(self, bundle: Bundle, options: BackendOptions):
        self.bundle = bundle
        self.options = options

    @property
    def device(self) -> str:
        return self.options.device

    @property
    def xp(self):
        """Array module of the arrays this backend takes and returns."""
        return np

    @abc.abstractmethod
    def __call__(self, batch):
        ...

    def close(self) -> None:
        """Release the session/engine (idempotent)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def describe(self) -> str:
        return f"{self.name} on {self.device}"
