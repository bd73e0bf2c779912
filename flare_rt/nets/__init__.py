"""The networks: architecture configs (plain data, no torch) and the torch U-Net built from them.

``build_network`` and ``network_from_bundle`` are the one way to get a torch network, used by the
torch backend, the export, the trainer and the CLI; they import torch on use.
"""
from .build import build_network, network_from_bundle
from .config import UNetConfig, big_unet_config, small_unet_config

__all__ = ["UNetConfig", "big_unet_config", "build_network", "network_from_bundle", "small_unet_config"]
