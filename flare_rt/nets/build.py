"""Building the torch U-Net: from an architecture (config or its dict form) or from a bundle, whose
ONNX initializers hold the weights. torch is imported here, on use, never by ``import flare_rt.nets``."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from ..errors import BackendUnavailableError, ModelError
from .config import UNetConfig

if TYPE_CHECKING:  # pragma: no cover
    from ..bundle import Bundle
    from .unet import UNet


def _unet_module():
    try:
        from . import unet
    except ImportError as exc:
        raise BackendUnavailableError(f"building the network needs PyTorch ({exc}); pip install 'flare-rt[torch]'") \
            from exc
    return unet


def build_network(architecture: UNetConfig | Mapping[str, Any], deep_supervision: bool | None = None) -> "UNet":
    """The U-Net of ``architecture`` (a :class:`UNetConfig` or a bundle's ``architecture`` dict), freshly
    initialised by torch, in eval mode. ``deep_supervision`` overrides the config's setting."""
    cfg = architecture if isinstance(architecture, UNetConfig) else UNetConfig.from_dict(dict(architecture))
    if deep_supervision is not None and deep_supervision != cfg.deep_supervision:
        from dataclasses import replace

        cfg = replace(cfg, deep_supervision=deep_supervision)
    return _unet_module().UNet(cfg).eval()


def network_from_bundle(bundle: "Bundle") -> "UNet":
    """The bundle's U-Net with its weights (read from the ONNX initializers), fp32, eval mode, on the CPU."""
    from ..onnx_graph import initializers
    from ..precision import require_float_weights

    require_float_weights(bundle.meta, bundle.path, "rebuilding its PyTorch network (torch backend, export)")
    unet = _unet_module()
    net = build_network(bundle.meta.architecture)
    inits = initializers(bundle.load_onnx())
    aliases = bundle.meta.weight_aliases
    state = {}
    skip = unet.auxiliary_keys(net)
    for key in net.state_dict():
        if key in skip:
            continue
        name = aliases.get(key, key)
        if name not in inits:
            raise ModelError(f"{bundle.path}: weight {key!r} not in the ONNX graph; re-export the bundle")
        state[key] = np.asarray(inits[name], dtype=np.float32)
    unet.load_weights(net, state, allow_missing_auxiliary=True)
    return net.eval()


def half_with_fp32_norm(net: "UNet") -> "UNet":
    """``net`` computing in fp16, its InstanceNorms in fp32 (the largest fp16 error source of 3D U-Nets):
    each norm takes its input in fp32 and gives fp16 back. Changes ``net`` in place and returns it."""
    import torch
    from torch import nn

    class Fp32Norm(nn.Module):
        def __init__(self, norm: nn.Module):
            super().__init__()
            self.norm = norm.float()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.norm(x.float()).to(x.dtype)

    net.half()
    for module in list(net.modules()):
        if hasattr(module, "norm") and isinstance(module.norm, nn.modules.instancenorm._InstanceNorm):
            module.norm = Fp32Norm(module.norm)
    return net
