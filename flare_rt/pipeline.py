"""segment(): io → orientation → crop → normalise → resample → sliding window → labels → io.

``mode="faithful"`` reproduces nnU-Net v2's predictor step by step (FLARE.md); ``mode="fast"``
changes what keeps agreement with it high (see :class:`FastOptions`)."""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .bundle import Bundle
from .errors import ConfigError
from .atomic import split_suffix
from .io import Volume, load_volume, write_labels, write_probabilities
from .orientation import plan_reorientation
from .postprocess import labels_faithful, labels_refined, refinable
from .preprocess import CropInfo, body_crop, compute_new_shape, ct_normalize, nonzero_crop, paste
from .resample import make_plan, resample, upsample_labels_nearest
from .statistics import default_statistics_path, sidecar_path
from .window import DEFAULT_TILE_STEP, WindowConfig, pad_to_patch, sliding_window_blocks

log = logging.getLogger(__name__)

MODES = ("faithful", "fast")


#: Fast mode's ROI: voxels above this are body (table and air mostly excluded). A setting of its own,
#: distinct from the input check's "is this CT" air threshold (``io.CT_MIN_AIR_HU``).
BODY_THRESHOLD_HU = -500.0
COMPUTE_DTYPES = ("float32", "float64")


@dataclass(frozen=True)
class FastOptions:
    """What fast mode changes, each measured in bench/run.py against faithful mode."""

    roi: bool = True  # skip tiles that hold no body voxel (nnU-Net's tile grid is kept)
    roi_crop: bool = False  # also crop to the body box (moves the resampling grid: measured in bench/)
    body_threshold_hu: float = BODY_THRESHOLD_HU  # body = voxels above this
    body_margin: int = 4  # voxels added around the body box (input grid), with roi_crop
    label_upsampling: bool = True  # labels of the resampled logits computed at label-upsampling cost
    compute_dtype: str = "float32"  # image resampling arithmetic (nnU-Net: float64)

    def __post_init__(self) -> None:
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ConfigError(f"fast option compute_dtype must be one of {COMPUTE_DTYPES}, got {self.compute_dtype!r}")
        if self.body_margin < 0:
            raise ConfigError(f"fast option body_margin must be >= 0 voxels, got {self.body_margin}")


def parse_fast_options(items: list[str] | None) -> FastOptions | None:
    """``["roi=0", "body_margin=2"]`` → FastOptions (the CLI's ``--fast-option KEY=VALUE``); None for none."""
    if not items:
        return None
    fields = FastOptions.__dataclass_fields__
    kw = {}
    for item in items:
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
    step: float | None = None  # tile step; None: the bundle's (nnU-Net: 0.5)
    tta: bool | None = None  # None: the bundle's default
    batch_size: int = 1
    probabilities: bool = False  # also compute class probabilities on the input grid
    force: bool = False  # segment images whose intensities do not look like CT
    series_uid: str | None = None
    fast: FastOptions | None = None  # fast mode's settings (None: defaults); an error in faithful mode

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.step is not None and not 0 < self.step <= 1:
            raise ConfigError(f"--step must be in (0, 1], got {self.step}; nnU-Net uses {DEFAULT_TILE_STEP}")
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {self.batch_size}")
        if self.mode == "faithful" and self.fast is not None:
            raise ConfigError("fast-mode options were given with --mode faithful; drop them or use --mode fast")

    @property
    def fast_options(self) -> FastOptions | None:
        """The fast-mode settings in effect, None in faithful mode."""
        return (self.fast or FastOptions()) if self.mode == "fast" else None


@dataclass
class Prediction:
    labels: np.ndarray  # (z, y, x) uint8 on the input grid
    probabilities: np.ndarray | None  # (K, z, y, x) float16 on the input grid
    timings: dict[str, float]
    tiles: int
    network_shape: tuple[int, int, int]


class StageTimer:
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
        step = meta.tile_step if options.step is None else options.step
        self.window = WindowConfig(patch_size=meta.patch_size, step=step, batch_size=options.batch_size,
                                   mirror_axes=meta.mirror_axes if tta else ())
        if meta.demo:
            log.warning("%s is a coarse DEMONSTRATION model (%s): its segmentations are not accurate",
                        bundle.path.name, meta.description or "demo")

    # -- stages -------------------------------------------------------------------------------
    def predict(self, volume: Volume, timer: StageTimer | None = None) -> Prediction:
        timer = timer or StageTimer()
        meta, opts = self.bundle.meta, self.options
        fast = opts.fast_options
        with timer("preprocess"):
            reo = plan_reorientation(volume.direction, meta.orientation)
            arr = reo.apply(volume.array).transpose(meta.transpose_forward)
            spacing = tuple(reo.spacing(volume.spacing)[i] for i in meta.transpose_forward)
            crop = nonzero_crop(arr) if meta.crop_nonzero else CropInfo(arr.shape, tuple((0, s) for s in arr.shape))
            if fast and fast.roi_crop:
                crop = body_crop(arr, fast.body_threshold_hu, fast.body_margin, crop)
            cropped = arr[crop.slices]
            data = ct_normalize(cropped, meta.normalization)[None]
            net_shape = compute_new_shape(crop.shape_after, spacing, meta.spacing)
            plan = make_plan(crop.shape_after, net_shape, spacing, meta.spacing, meta.resampling, probabilities=False)
            cdt = np.dtype(fast.compute_dtype if fast else "float64")
            data = resample(data, plan, out_dtype=np.float32, compute_dtype=cdt)
            keep = self._tile_filter(cropped, net_shape, fast.body_threshold_hu) if fast and fast.roi else None
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
                                           progress=bar)
            back = make_plan(net_shape, crop.shape_after, meta.spacing, spacing, meta.resampling, probabilities=True)
            if fast and fast.label_upsampling and not opts.probabilities and refinable(back):
                labels, probs = labels_refined(blocks, back), None
            else:
                labels, probs = labels_faithful(blocks, back, meta.num_classes, opts.probabilities)
        timer.t["network"] = net_time[0]
        timer.t["window+export"] -= net_time[0]
        with timer("export"):
            labels = paste(labels, crop)
            labels = reo.invert(labels.transpose(meta.transpose_backward))
            if probs is not None:
                full = paste(probs, crop)
                full[0][labels_mask_outside(crop)] = 1  # certain background outside the crop, as nnU-Net
                probs = np.stack([reo.invert(p.transpose(meta.transpose_backward)) for p in full])
        timer.t["blend+resample"] = timer.t.pop("window+export")
        return Prediction(np.ascontiguousarray(labels), probs, dict(timer.t), n_tiles[0], tuple(net_shape))

    def _tile_filter(self, cropped: np.ndarray, net_shape, threshold_hu: float):
        """Fast mode: keep only tiles that contain body voxels (above ``threshold_hu``)."""
        body = cropped > threshold_hu
        body_net = upsample_labels_nearest(body, net_shape)
        padded, _ = pad_to_patch(body_net[None], self.window.patch_size)
        mask = padded[0]
        pz, py, px = self.window.patch_size

        def keep(o) -> bool:
            return bool(mask[o[0]:o[0] + pz, o[1]:o[1] + py, o[2]:o[2] + px].any())

        return keep

    # -- files --------------------------------------------------------------------------------
    def segment_file(self, src: str | Path, outputs: "CaseOutputs | str | Path") -> Prediction:
        """Read ``src``, segment it, write the labels (and what ``outputs`` and the options ask for)."""
        timer = StageTimer()
        with timer("read"):
            vol = load_volume(src, self.options.series_uid, self.options.force)
        return self.segment_volume(vol, outputs, timer)

    def segment_volume(self, vol: Volume, outputs: "CaseOutputs | str | Path", timer: StageTimer | None = None) -> Prediction:
        """Segment a loaded volume and write the labels (and what ``outputs`` and the options ask for)."""
        outputs = outputs if isinstance(outputs, CaseOutputs) else CaseOutputs(Path(outputs))
        timer = timer or StageTimer()
        src = vol.source
        pred = self.predict(vol, timer)
        with timer("write"):
            write_labels(pred.labels, vol.geometry, outputs.labels)
            if pred.probabilities is not None:
                write_probabilities(pred.probabilities, self.bundle.meta.labels, outputs.probabilities)
            names = {k: v for k, v in self.bundle.meta.labels.items() if k != 0}
            if outputs.statistics is not None:
                from .statistics import statistics_report, structure_statistics, write_statistics_json

                stats = structure_statistics(pred.labels, vol.array, vol.spacing, names)
                write_statistics_json(statistics_report(stats, outputs.case, vol.spacing, self.bundle.meta.name),
                                      outputs.statistics)
            if outputs.preview is not None:
                from .preview import render_preview

                render_preview(vol.array, pred.labels, vol.spacing, vol.direction, outputs.preview,
                               title=f"{outputs.case} ({self.bundle.meta.name})", names=names)
        pred.timings = dict(timer.t)
        log.info("%s -> %s: %s", src, outputs.labels, ", ".join(f"{k} {v:.2f}s" for k, v in pred.timings.items()))
        return pred


@dataclass(frozen=True)
class CaseOutputs:
    """Where one case's results go; the optional ones are named after the label file, beside it."""

    labels: Path
    statistics: Path | None = None
    preview: Path | None = None

    @property
    def case(self) -> str:
        return split_suffix(self.labels)[0]

    @property
    def probabilities(self) -> Path:
        """``<name>.npz`` beside the labels (nnU-Net's convention), written when probabilities are asked for."""
        return sidecar_path(self.labels, ".npz")

    def default_statistics(self) -> Path:
        return default_statistics_path(self.labels)

    def default_preview(self) -> Path:
        from .preview import default_preview_path

        return default_preview_path(self.labels)

    def files(self, probabilities: bool) -> list[Path]:
        """Every file this case writes."""
        extra = [p for p in (self.statistics, self.preview) if p is not None]
        return [self.labels, *([self.probabilities] if probabilities else []), *extra]


def labels_mask_outside(crop: CropInfo) -> np.ndarray:
    inside = np.zeros(crop.shape_before, dtype=bool)
    inside[crop.slices] = True
    return ~inside
