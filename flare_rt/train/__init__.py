"""Training: one loop, composed from a config, that trains the paper's big and small networks (and a tiny
test network) on FLARE23-style data with partial labels, on one or several GPUs (torchrun), and ends
with a verified bundle the runtime segments with.

The names below are imported on first use, so ``flare_rt.train.command`` (the CLI) loads without torch;
using them needs torch (``pip install 'flare-rt[train]'``)."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "config": ("AugmentConfig", "BigModel", "DataConfig", "LossConfig", "ModelConfig", "OptimConfig",
               "RuntimeConfig", "ScheduleConfig", "SmallModel", "TinyModel", "TrainConfig", "config_from_dict",
               "load_config", "preset_path", "save_config"),
    "dataset": ("DatasetIndex", "build_index", "index_from_pairs", "load_index", "save_index"),
    "fingerprint": ("Fingerprint", "compute_fingerprint"),
    "loop": ("TrainResult", "train", "validation_scores"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted([*_WHERE, "Prepared", "prepare"])

# Imported here, not on first use: the function ``prepare`` shares its name with its module, and importing the
# module anywhere would otherwise leave the module, not the function, as ``flare_rt.train.prepare``. (It needs
# no torch.)
from .prepare import Prepared, prepare  # noqa: E402


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:  # pragma: no cover
    from .config import (AugmentConfig, BigModel, DataConfig, LossConfig, ModelConfig, OptimConfig,  # noqa: F401
                         RuntimeConfig, ScheduleConfig, SmallModel, TinyModel, TrainConfig, config_from_dict,
                         load_config, preset_path, save_config)
    from .dataset import DatasetIndex, build_index, index_from_pairs, load_index, save_index  # noqa: F401
    from .fingerprint import Fingerprint, compute_fingerprint  # noqa: F401
    from .loop import TrainResult, train, validation_scores  # noqa: F401
