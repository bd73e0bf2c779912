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
    # replay the fixed-shape forward as a CUDA graph where the backend can: network calls ~8 % faster, but the
    # graph's private pool keeps its activations, +212 MiB whole-device peak on ts269 for < 0.1 s (H200,
    # bench/gpu_profile.py): off unless asked for (flare-rt segment --cuda-graphs)
    cuda_graphs: bool = False
    batch_size: int = 1  # largest tile batch the pipeline passes (TensorRT builds its profile for it)


class Backend(abc.ABC):
    """Runs a bundle's network: ``backend(batch)`` with batch (B, C, *patch) of ``input_dtype`` →
    (B, K, *patch) logits (float32, or float16 from GPU backends; the pipeline accumulates in float32).

    A backend may return the same output buffer on every call of one batch shape (TensorRT does):
    consume or copy the result before the next call."""

    name: str = "?"
    #: dtype of the batches the backend takes without a conversion (GPU fp16 engines: float16)
    input_dtype = np.float32

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
