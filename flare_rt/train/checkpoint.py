"""Checkpoints that resume a run exactly: model, optimiser, AMP scaler, position in the schedule, the
history so far, and the RNG states of torch (CPU and CUDA), numpy and Python.

Everything is stored as tensors and plain Python values, so it loads with ``torch.load(weights_only=True)``."""
from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic import atomic_path
from ..errors import ConfigError, ModelError

log = logging.getLogger(__name__)

LATEST, FINAL = "checkpoint_latest.pt", "checkpoint_final.pt"


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state(legacy=False)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
        "numpy": {"bit_generator": np_state["bit_generator"], "key": torch.from_numpy(np_state["state"]["key"].copy()),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
        "python": random.getstate(),
    }


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state({"bit_generator": n["bit_generator"], "state": {"key": n["key"].numpy(), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def save_checkpoint(path: str | Path, *, model: torch.nn.Module, optimizer, scaler, epoch: int, iteration: int,
                    history: list[dict], config: dict, fingerprint: dict) -> Path:
    """``epoch`` and ``iteration``: the number of epochs / iterations completed. Written atomically."""
    path = Path(path)
    state = {"model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
             "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "epoch": int(epoch),
             "iteration": int(iteration), "history": history, "config": config, "fingerprint": fingerprint,
             "rng": rng_state()}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise ModelError(f"{path}: checkpoint not found") from exc
    except Exception as exc:  # torch raises pickle/RuntimeError variants for damaged files
        raise ModelError(f"{path}: unreadable checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
                         "delete it to start over or restore it from a backup") from exc


#: Settings a resumed run may change: they do not alter the batches, the schedule or the result.
FREE_TO_CHANGE = {"output": None, "runtime": ("progress", "num_workers", "threads", "ddp_timeout_min"),
                  "data": ("preprocess_workers",)}


def result_binding(config: dict) -> dict:
    """A config dict without the settings in :data:`FREE_TO_CHANGE`: what decides the trained result."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in config.items() if k != "output"}
    for section, keys in FREE_TO_CHANGE.items():
        for key in keys or ():
            out.get(section, {}).pop(key, None)
    return out


def check_same_config(ckpt: dict, config: dict, path: Path) -> None:
    """A resumed run must use the configuration that wrote the checkpoint (else the schedule differs),
    except for the settings in :data:`FREE_TO_CHANGE`."""
    old, new = result_binding(ckpt.get("config") or {}), result_binding(config)
    if old != new:
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        raise ConfigError(f"{path} was written with a different configuration (sections {diff} differ); resume "
                          "with the original config or train into a new output folder")
