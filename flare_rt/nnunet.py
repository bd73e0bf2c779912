"""Import trained nnU-Net v2 model folders (``plans.json``, ``dataset.json``, ``fold_X/checkpoint_*.pth``)."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .bundle import DEFAULT_TILE_STEP, BundleMeta, CTNormalization, ResamplingRule
from .errors import ModelError

log = logging.getLogger(__name__)

SUPPORTED_CLASSES = ("PlainConvUNet",)


@dataclass(frozen=True)
class NnUNetModel:
    meta: BundleMeta
    state_dict: dict


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ModelError(f"{path}: missing; an nnU-Net model folder holds plans.json, dataset.json and fold_X/")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ModelError(f"{path}: expected a JSON object, found a {type(data).__name__}")
    return data


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def resolve_configuration(plans: dict, name: str) -> dict:
    """The configuration ``name`` with its ``inherits_from`` chain merged (child keys win)."""
    configs = plans.get("configurations", {})
    chain, seen = [], set()
    while name is not None:
        if name not in configs:
            raise ModelError(f"plans.json has no configuration {name!r}; available: {sorted(configs)}")
        if name in seen:
            raise ModelError(f"plans.json: inherits_from cycle through {name!r}")
        seen.add(name)
        chain.append(configs[name])
        name = configs[name].get("inherits_from")
    merged: dict = {}
    for cfg in reversed(chain):
        merged.update(cfg)
    return merged


def architecture_from_config(cfg: dict, num_classes: int, in_channels: int) -> dict:
    """PlainConvUNet kwargs from the current (``architecture``) or older (``UNet_class_name``) plans layout."""
    if "architecture" in cfg:
        arch = cfg["architecture"]
        cls = arch.get("network_class_name", "").rsplit(".", 1)[-1]
        kw = arch["arch_kwargs"]
        if cls not in SUPPORTED_CLASSES:
            raise ModelError(f"network class {arch.get('network_class_name')!r} is not supported; "
                             f"flare-rt runs {', '.join(SUPPORTED_CLASSES)} only")
        features, kernels, strides = kw["features_per_stage"], kw["kernel_sizes"], kw["strides"]
        n_conv, n_conv_dec = kw["n_conv_per_stage"], kw["n_conv_per_stage_decoder"]
        if "InstanceNorm" not in str(kw.get("norm_op")) or "LeakyReLU" not in str(kw.get("nonlin")):
            raise ModelError(f"norm/nonlin {kw.get('norm_op')}/{kw.get('nonlin')} not supported "
                             "(InstanceNorm3d + LeakyReLU only)")
        if not kw.get("conv_bias", False):
            raise ModelError("conv_bias=False is not supported")
        if kw.get("dropout_op"):
            log.warning("dropout_op %s ignored at inference", kw["dropout_op"])
        eps = float((kw.get("norm_op_kwargs") or {}).get("eps", 1e-5))
        slope = float((kw.get("nonlin_kwargs") or {}).get("negative_slope", 0.01))
    elif "UNet_class_name" in cfg:
        if cfg["UNet_class_name"] not in SUPPORTED_CLASSES:
            raise ModelError(f"network class {cfg['UNet_class_name']!r} is not supported; "
                             f"flare-rt runs {', '.join(SUPPORTED_CLASSES)} only")
        kernels, strides = cfg["conv_kernel_sizes"], cfg["pool_op_kernel_sizes"]
        base, cap = cfg["UNet_base_num_features"], cfg.get("unet_max_num_features", 320)
        features = [min(base * 2**i, cap) for i in range(len(kernels))]
        n_conv, n_conv_dec = cfg["n_conv_per_stage_encoder"], cfg["n_conv_per_stage_decoder"]
        eps, slope = 1e-5, 0.01
    else:
        raise ModelError("plans configuration has neither 'architecture' nor 'UNet_class_name'; "
                         "is this an nnU-Net v2 plans.json?")
    if len(kernels[0]) != 3:
        raise ModelError(f"only 3D configurations are supported, got kernel sizes {kernels[0]}")
    return {
        "in_channels": in_channels,
        "num_classes": num_classes,
        "features_per_stage": [int(f) for f in features],
        "kernel_sizes": [[int(k) for k in ks] for ks in kernels],
        "strides": [[int(s) for s in st] for st in strides],
        "n_conv_per_stage": [int(n) for n in n_conv],
        "n_conv_per_stage_decoder": [int(n) for n in n_conv_dec],
        "norm_eps": eps,
        "negative_slope": slope,
        "deep_supervision": False,
    }


def _labels(dataset: dict) -> dict[int, str]:
    labels = dataset.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise ModelError("dataset.json has no 'labels' mapping")
    out = {}
    for name, value in labels.items():
        if isinstance(value, (list, tuple)):
            raise ModelError(f"region-based label {name!r}={value} is not supported (softmax models only)")
        out[int(value)] = name
    if sorted(out) != list(range(len(out))):
        raise ModelError(f"label values must be 0..N-1, got {sorted(out)}")
    return out


def _pick_checkpoint(model_dir: Path, fold: str | None, checkpoint: str) -> Path:
    if fold is None:
        folds = sorted(p.name for p in model_dir.glob("fold_*") if (p / checkpoint).is_file())
        if not folds:
            present = sorted(str(p.relative_to(model_dir)) for p in model_dir.glob("fold_*/*.pth"))
            raise ModelError(f"{model_dir}: no fold_*/{checkpoint} found; checkpoints present: {present or 'none'}"
                             + ("; pass --checkpoint with one of their names" if present else ""))
        if len(folds) > 1:
            log.warning("%s: several folds (%s); using %s (pass --fold to choose)", model_dir, folds, folds[0])
        return model_dir / folds[0] / checkpoint
    path = model_dir / f"fold_{fold}" / checkpoint
    if not path.is_file():
        raise ModelError(f"{path}: checkpoint not found; available: "
                         f"{sorted(str(p.relative_to(model_dir)) for p in model_dir.glob('fold_*/*.pth'))}")
    return path


def load_checkpoint(path: Path, trust: bool = False) -> dict:
    """Load an nnU-Net checkpoint with ``weights_only=True`` and an allow-list of the plain numpy types
    nnU-Net stores; full unpickling only when ``trust`` is set."""
    import numpy as np
    import torch

    if path.stat().st_size == 0:
        raise ModelError(f"{path}: the checkpoint is empty (0 bytes); copy it again from the trained model")
    if not _torch_file(path):
        raise ModelError(f"{path}: not a readable PyTorch checkpoint: neither a complete zip archive nor a pickle "
                         "(corrupt, truncated or another kind of file); copy it again from the trained model")
    if trust:
        log.warning("%s: full unpickling (--trust-checkpoint): only do this for files you trust", path)
        try:
            return _checked(torch.load(path, map_location="cpu", weights_only=False), path)
        except ModelError:
            raise
        except Exception as exc:  # torch raises pickle, zip and runtime errors for a damaged file
            raise ModelError(f"{path}: not a readable PyTorch checkpoint ({_first_line(exc)}); "
                             "copy it again from the trained model") from exc
    allowed = [np.dtype, np.ndarray, np.float32, np.float64, np.int64, np.int32, np.bool_]
    try:
        from numpy._core.multiarray import _reconstruct, scalar  # numpy >= 2

        allowed += [_reconstruct, scalar]
    except ImportError:  # pragma: no cover - numpy 1.x
        pass
    allowed += [type(np.dtype(t)) for t in ("float32", "float64", "int64", "int32", "bool")]
    try:
        with torch.serialization.safe_globals([a for a in allowed if a is not None]):
            return _checked(torch.load(path, map_location="cpu", weights_only=True), path)
    except ModelError:
        raise
    except Exception as exc:  # torch raises pickle.UnpicklingError / RuntimeError for disallowed globals
        if isinstance(exc, FileNotFoundError):
            raise ModelError(f"{path}: checkpoint not found") from exc
        if "Unsupported global" in str(exc) or "Weights only load failed" in str(exc):
            raise ModelError(f"{path}: checkpoint cannot be loaded safely ({_first_line(exc)}); "
                             "if you trust this file, pass --trust-checkpoint") from exc
        raise ModelError(f"{path}: not a readable PyTorch checkpoint, corrupt or truncated ({_first_line(exc)}); "
                         "copy it again from the trained model") from exc


def _torch_file(path: Path) -> bool:
    """What ``torch.save`` writes: a zip archive (with its central directory, so not cut short), or a
    legacy pickle (first byte: the pickle PROTO opcode)."""
    import zipfile

    if zipfile.is_zipfile(path):
        return True
    with open(path, "rb") as fh:
        return fh.read(1) == b"\x80"


def _checked(ckpt, path: Path) -> dict:
    if not isinstance(ckpt, dict):
        raise ModelError(f"{path}: not an nnU-Net checkpoint (it holds a {type(ckpt).__name__}, not a dict)")
    return ckpt


def read_nnunet_model(model_dir: str | Path, configuration: str = "3d_fullres", fold: str | None = None,
                      checkpoint: str = "checkpoint_final.pth", trust_checkpoint: bool = False) -> NnUNetModel:
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelError(f"{model_dir}: not a directory; pass an nnU-Net trained-model folder")
    plans = _read_json(model_dir / "plans.json")
    dataset = _read_json(model_dir / "dataset.json")
    try:
        return _read_model(model_dir, plans, dataset, configuration, fold, checkpoint, trust_checkpoint)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        what = f"missing key {exc}" if isinstance(exc, KeyError) else _first_line(exc)
        raise ModelError(f"{model_dir}: plans.json, dataset.json or the checkpoint do not describe an nnU-Net v2 "
                         f"model ({what}); pass the folder nnU-Net's training wrote") from exc


def _read_model(model_dir: Path, plans: dict, dataset: dict, configuration: str, fold: str | None,
                checkpoint: str, trust_checkpoint: bool) -> NnUNetModel:
    cfg = resolve_configuration(plans, configuration)
    labels = _labels(dataset)
    channels = dataset.get("channel_names") or dataset.get("modality") or {"0": "CT"}
    if len(channels) != 1:
        raise ModelError(f"{len(channels)} input channels; flare-rt runs single-channel CT models")
    schemes = cfg.get("normalization_schemes", [])
    if schemes != ["CTNormalization"]:
        raise ModelError(f"normalization {schemes} not supported; flare-rt runs CTNormalization models")
    if cfg.get("use_mask_for_norm", [False]) != [False]:
        raise ModelError("use_mask_for_norm=True is not supported for CT")
    props = plans["foreground_intensity_properties_per_channel"]["0"]
    norm = CTNormalization(mean=float(props["mean"]), std=float(props["std"]),
                           lower=float(props["percentile_00_5"]), upper=float(props["percentile_99_5"]))
    dk = cfg.get("resampling_fn_data_kwargs", {})
    pk = cfg.get("resampling_fn_probabilities_kwargs", {})
    for key in ("resampling_fn_data", "resampling_fn_probabilities"):
        if cfg.get(key, "resample_data_or_seg_to_shape") != "resample_data_or_seg_to_shape":
            raise ModelError(f"{key}={cfg[key]!r} is not supported (resample_data_or_seg_to_shape only)")
    rule = ResamplingRule(
        data_order=int(dk.get("order", 3)), data_order_z=int(dk.get("order_z", 0)),
        prob_order=int(pk.get("order", 1)), prob_order_z=int(pk.get("order_z", 0)),
        force_separate_z=dk.get("force_separate_z"),
    )
    ckpt_path = _pick_checkpoint(model_dir, fold, checkpoint)
    ckpt = load_checkpoint(ckpt_path, trust_checkpoint)
    if "network_weights" not in ckpt:
        raise ModelError(f"{ckpt_path}: no 'network_weights' key; keys are {sorted(ckpt)}")
    mirror = tuple(int(a) for a in ckpt.get("inference_allowed_mirroring_axes") or ())
    arch = architecture_from_config(cfg, num_classes=len(labels), in_channels=1)
    meta = BundleMeta(
        name=f"{plans.get('dataset_name', model_dir.name)}:{configuration}",
        labels=labels,
        spacing=tuple(float(s) for s in cfg["spacing"]),
        patch_size=tuple(int(p) for p in cfg["patch_size"]),
        normalization=norm,
        architecture=arch,
        tile_step=DEFAULT_TILE_STEP,
        mirror_axes=mirror,
        tta=False,
        orientation="none",
        transpose_forward=tuple(int(t) for t in plans.get("transpose_forward", (0, 1, 2))),
        resampling=rule,
        source=f"nnU-Net v2 {model_dir.name} {ckpt_path.relative_to(model_dir)} "
               f"(trainer {ckpt.get('trainer_name', '?')}, configuration {configuration})",
        producer=f"flare-rt {__version__}",
    )
    return NnUNetModel(meta=meta, state_dict=ckpt["network_weights"])
