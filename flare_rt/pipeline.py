"""segment(): io → orientation → crop → normalise → resample → sliding window → labels → io.

``mode="faithful"`` reproduces nnU-Net v2's predictor step by step (FLARE.md); ``mode="fast"``
changes what keeps agreement with it high (see :class:`FastOptions`)."""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .bundle import Bundle
from .confidence import ConfidenceRows
from .errors import ConfigError
from .io import Volume, load_volume, write_labels, write_probabilities
from .orientation import plan_reorientation
from .postprocess import labels_faithful, labels_refined
from .preprocess import CropInfo, body_crop, compute_new_shape, ct_normalize, nonzero_crop, paste
from .resample import make_plan, resample, upsample_labels_nearest
from .window import WindowConfig, pad_to_patch, sliding_window_blocks

log = logging.getLogger(__name__)

MODES = ("faithful", "fast")


@dataclass(frozen=True)
class FastOptions:
    """What fast mode changes, each measured in bench/run.py against faithful mode."""

    roi: bool = True  # skip tiles that hold no body voxel (nnU-Net's tile grid is kept)
    roi_crop: bool = False  # also crop to the body box (moves the resampling grid: measured in bench/)
    body_threshold_hu: float = -500.0  # body = voxels above this
    body_margin: int = 4  # voxels added around the body box (input grid), with roi_crop
    step: float = 0.5  # tile step (nnU-Net: 0.5)
    label_upsampling: bool = True  # labels of the resampled logits computed at label-upsampling cost
    compute_dtype: str = "float32"  # image resampling arithmetic (nnU-Net: float64)


def parse_fast_options(items: list[str] | None) -> FastOptions:
    """``["roi=0", "step=0.6"]`` → FastOptions (the CLI's ``--fast-option KEY=VALUE``)."""
    fields = FastOptions.__dataclass_fields__
    kw = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise ConfigError(f"--fast-option takes KEY=VALUE with KEY in {sorted(fields)}, got {item!r}")
        typ = type(getattr(FastOptions(), key))
        if typ is bool:
            if value.lower() not in ("0", "1", "true", "false", "yes", "no"):
                raise ConfigError(f"--fast-option {key} takes 0/1, got {value!r}")
            kw[key] = value.lower() in ("1", "true", "yes")
        else:
            try:
                kw[key] = typ(value)
            except ValueError as exc:
                raise ConfigError(f"--fast-option {key} takes a {typ.__name__}, got {value!r}") from exc
    return FastOptions(**kw)


@dataclass(frozen=True)
class SegmentOptions:
    mode: str = "fast"
    step: float | None = None  # None: the bundle's tile step (faithful) or FastOptions.step (fast)
    tta: bool | None = None  # None: the bundle's default
    batch_size: int = 1
    save_probabilities: bool = False
    force: bool = False  # segment images whose intensities do not look like CT
    series_uid: str | None = None
    fast: FastOptions = field(default_factory=FastOptions)
    confidence: bool = False  # also return the winning class's softmax probability as uint8 (Prediction.confidence)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.step is not None and not 0 < self.step <= 1:
            raise ConfigError(f"--step must be in (0, 1], got {self.step}; nnU-Net uses 0.5")
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {self.batch_size}")


@dataclass
class Prediction:
    labels: np.ndarray  # (z, y, x) uint8 on the input grid
    probabilities: np.ndarray | None  # (K, z, y, x) float16 on the input grid
    timings: dict[str, float]
    tiles: int
    network_shape: tuple[int, int, int]
    confidence: np.ndarray | None = None  # (z, y, x) uint8, round(255 * max softmax), when asked


class _Timer:
    def __init__(self):
        self.t: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.t[name] = self.t.get(name, 0.0) + time.perf_counter() - t0


class Segmenter:
    """A loaded model (bundle + backend) that segments volumes; load once, call for each case."""

    def __init__(self, bundle: Bundle, backend, options: SegmentOptions = SegmentOptions(), progress: bool = False):
        self.bundle, self.backend, self.options, self.progress = bundle, backend, options, progress
        meta = bundle.meta
        tta = meta.tta if options.tta is None else options.tta
        step = options.step if options.step is not None else (meta.tile_step if options.mode == "faithful"
                                                               else options.fast.step)
        self.window = WindowConfig(patch_size=meta.patch_size, step=step, batch_size=options.batch_size,
                                   mirror_axes=meta.mirror_axes if tta else ())
        if meta.demo:
            log.warning("%s is a coarse DEMONSTRATION model: its segmentations are not accurate", bundle.path)

    # -- stages -------------------------------------------------------------------------------
    def predict(self, volume: Volume, timer: _Timer | None = None) -> Prediction:
        timer = timer or _Timer()
        meta, opts = self.bundle.meta, self.options
        fast = opts.mode == "fast"
        with timer("preprocess"):
            reo = plan_reorientation(volume.direction, meta.orientation)
            arr = reo.apply(volume.array).transpose(meta.transpose_forward)
            spacing = tuple(reo.spacing(volume.spacing)[i] for i in meta.transpose_forward)
            crop = nonzero_crop(arr) if meta.crop_nonzero else CropInfo(arr.shape, tuple((0, s) for s in arr.shape))
            if fast and opts.fast.roi_crop:
                crop = body_crop(arr, opts.fast.body_threshold_hu, opts.fast.body_margin, crop)
            cropped = arr[crop.slices]
            data = ct_normalize(cropped, meta.normalization)[None]
            net_shape = compute_new_shape(crop.shape_after, spacing, meta.spacing)
            plan = make_plan(crop.shape_after, net_shape, spacing, meta.spacing, meta.resampling, probabilities=False)
            cdt = np.float32 if fast and opts.fast.compute_dtype == "float32" else np.float64
            data = resample(data, plan, out_dtype=np.float32, compute_dtype=cdt)
            keep = self._tile_filter(cropped, net_shape) if fast and opts.fast.roi else None
        net_time = [0.0]
        n_tiles = [0]

        def network(batch):
            t0 = time.perf_counter()
            out = self.backend(batch)
            net_time[0] += time.perf_counter() - t0
            n_tiles[0] += len(batch)
            return out

        from tqdm import tqdm

        bar = tqdm(desc="tiles", unit="tile", disable=not self.progress, leave=False)
        with timer("window+export"), bar:
            blocks = sliding_window_blocks(data, network, meta.num_classes, self.window, keep_tile=keep,
                                           progress=bar.update)
            back = make_plan(net_shape, crop.shape_after, meta.spacing, spacing, meta.resampling, probabilities=True)
            refined = (fast and opts.fast.label_upsampling and not opts.save_probabilities and not opts.confidence
                       and back.separate_axis == 0 and back.order == 1 and back.order_z == 0)
            conf_rows = ConfidenceRows(back.out_shape) if opts.confidence else None
            if refined:
                labels, probs = labels_refined(blocks, back), None
            else:
                labels, probs = labels_faithful(blocks, back, meta.num_classes, opts.save_probabilities,
                                                on_plane=conf_rows)
        timer.t["network"] = net_time[0]
        timer.t["window+export"] -= net_time[0]
        with timer("export"):
            labels = paste(labels, crop)
            labels = reo.invert(labels.transpose(meta.transpose_backward))
            if probs is not None:
                full = paste(probs, crop)
                full[0][labels_mask_outside(crop)] = 1  # certain background outside the crop, as nnU-Net
                probs = np.stack([reo.invert(p.transpose(meta.transpose_backward)) for p in full])
            conf = None
            if conf_rows is not None:  # certain background outside the crop, as the probabilities
                conf = np.ascontiguousarray(reo.invert(paste(conf_rows.array, crop, fill=255)
                                                       .transpose(meta.transpose_backward)))
        timer.t["blend+resample"] = timer.t.pop("window+export")
        return Prediction(np.ascontiguousarray(labels), probs, dict(timer.t), n_tiles[0], tuple(net_shape), conf)

    def _tile_filter(self, cropped: np.ndarray, net_shape):
        """Fast mode: keep only tiles that contain body voxels (above the HU threshold)."""
        body = cropped > self.options.fast.body_threshold_hu
        body_net = upsample_labels_nearest(body, net_shape)
        padded, _ = pad_to_patch(body_net[None], self.window.patch_size)
        mask = padded[0]
        pz, py, px = self.window.patch_size

        def keep(o) -> bool:
            return bool(mask[o[0]:o[0] + pz, o[1]:o[1] + py, o[2]:o[2] + px].any())

        return keep

    # -- files --------------------------------------------------------------------------------
    def segment_file(self, src: str | Path, dst: str | Path, probabilities: str | Path | None = None) -> Prediction:
        timer = _Timer()
        with timer("read"):
            vol = load_volume(src, self.options.series_uid, self.options.force)
        pred = self.predict(vol, timer)
        with timer("write"):
            write_labels(pred.labels, vol.reference, dst)
            if probabilities is not None and pred.probabilities is not None:
                write_probabilities(pred.probabilities, self.bundle.meta.labels, probabilities)
        pred.timings = dict(timer.t)
        log.info("%s -> %s: %s", src, dst, ", ".join(f"{k} {v:.2f}s" for k, v in pred.timings.items()))
        return pred


def labels_mask_outside(crop: CropInfo) -> np.ndarray:
    inside = np.zeros(crop.shape_before, dtype=bool)
    inside[crop.slices] = True
    return ~inside
