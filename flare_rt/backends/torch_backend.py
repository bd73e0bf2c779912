"""PyTorch backend (CPU/CUDA). The network is rebuilt from the bundle's architecture and its weights
read from the bundle's ONNX initializers (one copy of the weights)."""
from __future__ import annotations

import numpy as np

from ..errors import BackendUnavailableError, ModelError
from ..onnx_graph import initializers
from ..xp import array_module
from .base import Backend, BackendOptions


def _torch():
    try:
        import torch
    except ImportError as exc:
        raise BackendUnavailableError("the torch backend needs PyTorch: pip install 'flare-rt[torch]'") from exc
    return torch


def network_from_bundle(bundle):
    """The bundle's U-Net with its weights, in fp32, eval mode (on the CPU)."""
    _torch()
    from ..export import build_network
    from ..nets.unet import auxiliary_keys, load_weights

    net = build_network(bundle.meta)
    inits = initializers(bundle.load_onnx())
    aliases = bundle.meta.weight_aliases
    state = {}
    skip = auxiliary_keys(net)
    for key in net.state_dict():
        if key in skip:
            continue
        name = aliases.get(key, key)
        if name not in inits:
            raise ModelError(f"{bundle.path}: weight {key!r} not in the ONNX graph; re-export the bundle")
        state[key] = np.asarray(inits[name], dtype=np.float32)
    load_weights(net, state, allow_missing_auxiliary=True)
    return net.eval()


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
