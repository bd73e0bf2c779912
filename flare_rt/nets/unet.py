"""A compact 3D U-Net whose state dict loads nnU-Net v2 ``PlainConvUNet`` weights one-to-one.

Module names mirror ``dynamic_network_architectures`` (``encoder.stages.S.0.convs.I.conv``,
``decoder.transpconvs.I``, ``decoder.seg_layers.I``) so a checkpoint loads without renaming; the
aliases nnU-Net also stores (``all_modules``, ``decoder.encoder``) are dropped by
:func:`canonical_state_dict`.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..errors import ModelError
from .config import UNetConfig


class ConvNormAct(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: tuple[int, ...], stride: tuple[int, ...], cfg: UNetConfig):
        super().__init__()
        self.conv = nn.Conv3d(cin, cout, kernel, stride, padding=[(k - 1) // 2 for k in kernel], bias=True)
        self.norm = nn.InstanceNorm3d(cout, eps=cfg.norm_eps, affine=True)
        self.nonlin = nn.LeakyReLU(cfg.negative_slope, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.nonlin(self.norm(self.conv(x)))


class StackedConvBlocks(nn.Module):
    """n conv-norm-act blocks; the first carries the stage's stride."""

    def __init__(self, n: int, cin: int, cout: int, kernel, first_stride, cfg: UNetConfig):
        super().__init__()
        self.convs = nn.Sequential(
            *[ConvNormAct(cin if i == 0 else cout, cout, kernel, first_stride if i == 0 else (1, 1, 1), cfg)
              for i in range(n)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convs(x)


class Encoder(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        stages, cin = [], cfg.in_channels
        for s in range(cfg.n_stages):
            cout = cfg.features_per_stage[s]
            block = StackedConvBlocks(cfg.n_conv_per_stage[s], cin, cout, cfg.kernel_sizes[s], cfg.strides[s], cfg)
            stages.append(nn.Sequential(block))  # nnU-Net wraps each stage: stages.S.0.convs...
            cin = cout
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        skips = []
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        return skips


class Decoder(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.deep_supervision = cfg.deep_supervision
        feats = cfg.features_per_stage
        transp, stages, segs = [], [], []
        for s in range(1, cfg.n_stages):
            below, skip = feats[-s], feats[-(s + 1)]
            stride = cfg.strides[-s]
            transp.append(nn.ConvTranspose3d(below, skip, stride, stride, bias=True))
            stages.append(StackedConvBlocks(cfg.n_conv_per_stage_decoder[s - 1], 2 * skip, skip,
                                            cfg.kernel_sizes[-(s + 1)], (1, 1, 1), cfg))
            segs.append(nn.Conv3d(skip, cfg.num_classes, 1, 1, 0, bias=True))
        self.transpconvs = nn.ModuleList(transp)
        self.stages = nn.ModuleList(stages)
        self.seg_layers = nn.ModuleList(segs)

    def forward(self, skips: list[torch.Tensor]):
        x = skips[-1]
        outputs = []
        for i, (up, stage) in enumerate(zip(self.transpconvs, self.stages)):
            x = stage(torch.cat((up(x), skips[-(i + 2)]), 1))
            if self.deep_supervision:
                outputs.append(self.seg_layers[i](x))
            elif i == len(self.stages) - 1:
                outputs.append(self.seg_layers[-1](x))
        outputs = outputs[::-1]  # highest resolution first, like nnU-Net
        return outputs if self.deep_supervision else outputs[0]


class UNet(nn.Module):
    """(B, C_in, Z, Y, X) → (B, num_classes, Z, Y, X) logits (a list, finest first, with deep supervision)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    def forward(self, x: torch.Tensor):
        return self.decoder(self.encoder(x))


def canonical_state_dict(state: dict) -> dict:
    """Drop the aliases nnU-Net keeps (``.all_modules.`` and ``decoder.encoder.``) and ``_orig_mod.``."""
    out = {}
    for k, v in state.items():
        k = k.replace("_orig_mod.", "")
        if ".all_modules." in k or k.startswith("decoder.encoder."):
            continue
        out[k] = v
    return out


def auxiliary_keys(net: UNet) -> set[str]:
    """Parameters inference never uses: the deep-supervision heads other than the final one."""
    last = len(net.decoder.seg_layers) - 1
    return {k for k in net.state_dict() if k.startswith("decoder.seg_layers.") and int(k.split(".")[2]) != last}


def load_weights(net: UNet, state: dict, allow_missing_auxiliary: bool = False) -> None:
    """Load an nnU-Net/flare-rt state dict strictly, with an error that lists what does not match.
    ``allow_missing_auxiliary`` accepts state dicts without the unused deep-supervision heads (bundles
    store inference weights only); those heads then keep their initial values."""
    state = canonical_state_dict(state)
    own = net.state_dict()
    if allow_missing_auxiliary:
        own = {k: v for k, v in own.items() if k not in auxiliary_keys(net)}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        raise ModelError(
            "weights do not fit the architecture: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}, shape mismatches {shapes[:3]}; "
            "check that the plans' architecture matches the checkpoint"
        )
    tensors = {k: v if isinstance(v, torch.Tensor) else torch.from_numpy(np.array(v)) for k, v in state.items()}
    net.load_state_dict(tensors, strict=not allow_missing_auxiliary)
