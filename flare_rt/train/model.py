"""The network to train: the runtime's U-Net with deep supervision, He-initialised as nnU-Net does."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from ..errors import ModelError
from ..nets import build_network
from ..nets.unet import UNet, load_weights
from .config import ModelConfig

log = logging.getLogger(__name__)


def he_init(net: nn.Module, negative_slope: float = 1e-2) -> nn.Module:
    """``kaiming_normal_(a=negative_slope)`` on every (transposed) convolution weight, zero biases."""
    for m in net.modules():
        if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)):
            nn.init.kaiming_normal_(m.weight, a=negative_slope)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return net


def init_network(model: ModelConfig, num_classes: int, deep_supervision: bool = True, seed: int | None = None,
                 negative_slope: float = 1e-2) -> UNet:
    """A freshly He-initialised training network (``seed`` makes the initialisation reproducible)."""
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return he_init(build_network(model.unet(num_classes, deep_supervision)).train(), negative_slope)
    return he_init(build_network(model.unet(num_classes, deep_supervision)).train(), negative_slope)


def inference_network(net: UNet) -> UNet:
    """A copy of ``net`` without deep supervision (what a bundle holds), on the CPU, in eval mode."""
    out = build_network(net.cfg, deep_supervision=False)
    out.load_state_dict({k: v.detach().cpu() for k, v in net.state_dict().items()})
    return out.eval()


def load_initial_weights(net: UNet, path: str | Path) -> None:
    """Start from a training checkpoint (``.pt``, its ``model`` entry) or a bundle (``.onnx``; the deep
    supervision heads it lacks keep their initialisation)."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: init_weights not found; give a training checkpoint (.pt) or bundle (.onnx)")
    if path.suffix == ".onnx":
        from ..bundle import Bundle
        from ..nets import network_from_bundle
        from ..nets.unet import auxiliary_keys

        skip = auxiliary_keys(net)
        state = {k: v for k, v in network_from_bundle(Bundle.load(path)).state_dict().items() if k not in skip}
        load_weights(net, state, allow_missing_auxiliary=True)
    else:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if "model" not in ckpt:
            raise ModelError(f"{path}: not a flare-rt training checkpoint (no 'model' entry; keys {sorted(ckpt)[:6]})")
        load_weights(net, ckpt["model"])
    log.info("initial weights from %s", path)
