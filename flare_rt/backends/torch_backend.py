"""PyTorch backend (CPU/CUDA). The network is rebuilt from the bundle's architecture and its weights
read from the bundle's ONNX initializers (one copy of the weights)."""
from __future__ import annotations

import numpy as np

from ..errors import BackendUnavailableError
from ..nets import network_from_bundle
from ..xp import array_module
from .base import Backend, BackendOptions


def _torch():
    try:
        import torch
    except ImportError as exc:
        raise BackendUnavailableError("the torch backend needs PyTorch: pip install 'flare-rt[torch]'") from exc
    return torch


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, bundle, options: BackendOptions):
        super().__init__(bundle, options)
        torch = _torch()
        if options.device == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailableError("torch has no CUDA device here; use --device cpu")
        if options.threads:
            torch.set_num_threads(int(options.threads))
        self._torch = torch
        self._dev = torch.device(options.device)
        self.net = network_from_bundle(bundle).to(self._dev)

    def __call__(self, batch):
        torch = self._torch
        xp = array_module(batch)
        with torch.inference_mode():
            if xp is np:
                x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self._dev)
                return self.net(x).float().cpu().numpy()
            x = torch.from_dlpack(batch).float()
            return xp.from_dlpack(self.net(x).float().contiguous())

    def close(self) -> None:
        self.net = None
