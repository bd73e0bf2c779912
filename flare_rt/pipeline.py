"""segment(): io → orientation → crop → normalise → resample → sliding window → labels → io.

``mode="faithful"`` reproduces nnU-Net v2's predictor step by step (FLARE.md); ``mode="fast"``
changes what keeps agreement with it high (see :class:`FastOptions`)."""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .atomic import split_suffix
from .bundle import DEFAULT_TILE_STEP, Bundle
from .confidence import ConfidenceRows
from .errors import ConfigError, ResourceError
from .gpu import DeviceClock, free_cached_memory, is_device, is_out_of_memory, synchronize
from .io import Volume, load_volume, write_labels, write_probabilities
from .orientation import plan_reorientation
from .postprocess import labels_faithful, labels_refined, refinable
from .preprocess import CropInfo, body_crop, compute_new_shape, ct_normalize, nonzero_crop
from .resample import make_plan, resample, upsample_labels_nearest
from .statistics import default_statistics_path, sidecar_path
from .window import WindowConfig, pad_to_patch, sliding_window_blocks, tile_origins
from .xp import array_module, to_device, to_host

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
    network_labels: bool = False  # also keep the argmax of the blended logits at network resolution
    confidence: bool = False  # also return the winning class's softmax probability as uint8 (Prediction.confidence)

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
    network_labels: np.ndarray | None = None  # (network_shape) uint8 argmax before resampling, when asked for
    confidence: np.ndarray | None = None  # (z, y, x) uint8, round(255 * max softmax), when asked for


# rows per logits block of the sliding window on a GPU (WindowConfig.block_rows): 2 blocks of 15 classes x 8 x 333
# x 333 float32 are 106 MiB where whole finished ranges were 368 MiB of a 880 MiB peak on ts269 (H200 profile)
DEVICE_BLOCK_ROWS = 8


class StageTimer:
    """Wall time per named stage; ``sync`` (the device's) is called at the end of each stage so that
    asynchronous GPU work is charged to the stage that queued it."""

    def __init__(self, sync=None):
        self.t: dict[str, float] = {}
        self.sync = sync

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.sync is not None:
                self.sync()
            self.t[name] = self.t.get(name, 0.0) + time.perf_counter() - t0


def compact_ct(array: np.ndarray) -> np.ndarray:
    """A contiguous copy to send to the device: integer CT in int16 when its values fit (half the bytes of
    int32), floats as float32."""
    if array.dtype.kind in "iu" and array.dtype.itemsize > 2 and array.size:
        info = np.iinfo(np.int16)
        if info.min <= int(array.min()) and int(array.max()) <= info.max:
            return np.ascontiguousarray(array, dtype=np.int16)
    if array.dtype.kind == "f" and array.dtype != np.float32:
        return np.ascontiguousarray(array, dtype=np.float32)
    return np.ascontiguousarray(array)


class Segmenter:
    """A loaded model (bundle + backend) that segments volumes; load once, call for each case.

    The arrays live where the backend computes (``backend.xp``: numpy, or CuPy on a GPU): the CT goes
    there once (as int16 where it fits), every stage runs there with the same functions, and only the
    uint8 labels (and probabilities when asked for) come back."""

    def __init__(self, bundle: Bundle, backend, options: SegmentOptions = SegmentOptions(), progress: bool = False):
        self.bundle, self.backend, self.options, self.progress = bundle, backend, options, progress
        meta = bundle.meta
        tta = meta.tta if options.tta is None else options.tta
        step = meta.tile_step if options.step is None else options.step
        self.window = WindowConfig(patch_size=meta.patch_size, step=step, batch_size=options.batch_size,
                                   mirror_axes=meta.mirror_axes if tta else (),
                                   threads=getattr(getattr(backend, "options", None), "threads", None),
                                   block_rows=DEVICE_BLOCK_ROWS if is_device(self.xp) else None)
        if meta.demo:
            log.warning("%s is a coarse DEMONSTRATION model: its segmentations are not accurate", bundle.path.name)

    @property
    def xp(self):
        """The array module of the backend's device (numpy for callables without one)."""
        return getattr(self.backend, "xp", np)

    # -- stages -------------------------------------------------------------------------------
    def predict(self, volume: Volume, timer: StageTimer | None = None) -> Prediction:
        """Labels (and what the options ask for) of ``volume`` on its own grid. Out of memory in the sliding
        window (and the way back it streams into) retries with smaller tile batches; elsewhere (upload,
        preprocessing, download), or with one tile per batch, it is a :class:`ResourceError` (exit code 7)."""
        try:
            return self._predict(volume, timer)
        except Exception as exc:  # noqa: BLE001 - only out-of-memory is handled, the rest re-raised
            if not is_out_of_memory(exc):
                raise
            free_cached_memory(self.xp)
            raise self._out_of_memory(volume, "outside the sliding window", exc) from exc

    def _out_of_memory(self, volume: Volume, where: str, exc: BaseException) -> ResourceError:
        if is_device(self.xp):
            return ResourceError(f"{volume.source}: out of GPU memory {where} ({type(exc).__name__}); use a GPU "
                                 "with more free memory, or --device cpu")
        return ResourceError(f"{volume.source}: out of host memory {where} ({type(exc).__name__}); use a machine "
                             "with more free RAM")

    def _predict(self, volume: Volume, timer: StageTimer | None) -> Prediction:
        xp = self.xp
        timer = timer or StageTimer()
        timer.sync = (lambda: synchronize(xp)) if is_device(xp) else None
        meta, opts = self.bundle.meta, self.options
        fast = opts.fast_options
        with timer("upload"):
            reo = plan_reorientation(volume.direction, meta.orientation)
            arr = to_device(compact_ct(reo.apply(volume.array).transpose(meta.transpose_forward)), xp)
            spacing = tuple(reo.spacing(volume.spacing)[i] for i in meta.transpose_forward)
        with timer("preprocess"):
            crop = nonzero_crop(arr) if meta.crop_nonzero else CropInfo(arr.shape, tuple((0, s) for s in arr.shape))
            if fast and fast.roi_crop:
                crop = body_crop(arr, fast.body_threshold_hu, fast.body_margin, crop)
            cropped = arr[crop.slices]
            net_shape = compute_new_shape(crop.shape_after, spacing, meta.spacing)
            plan = make_plan(crop.shape_after, net_shape, spacing, meta.spacing, meta.resampling, probabilities=False)
            cdt = np.dtype(fast.compute_dtype if fast else "float64")
            data = resample(cropped[None], plan, out_dtype=np.float32, compute_dtype=cdt,
                            pre=lambda a: ct_normalize(a, meta.normalization), threads=self.window.threads)
            keep = self._tile_filter(cropped, net_shape, fast.body_threshold_hu) if fast and fast.roi else None
        full_shape = arr.shape
        del arr, cropped  # the uploaded CT is not needed past here: a GPU's peak is in the window (137 MiB on ts269)
        back = make_plan(net_shape, crop.shape_after, meta.spacing, spacing, meta.resampling, probabilities=True)
        window = self.window
        while True:
            try:
                labels, probs, conf, tiles, net_labels = self._window_and_labels(data, window, keep, back, crop,
                                                                                 full_shape, timer)
                break
            except Exception as exc:  # noqa: BLE001 - only out-of-memory is handled, the rest re-raised
                if not is_out_of_memory(exc):
                    raise
                free_cached_memory(xp)
                if window.batch_size == 1:
                    raise self._out_of_memory(volume, "even with one tile per batch", exc) from exc
                smaller = replace(window, batch_size=max(1, window.batch_size // 2))
                log.warning("%s: out of memory with %d tiles per batch; retrying with %d", volume.source,
                            window.batch_size, smaller.batch_size)
                window = smaller
        with timer("download"):
            labels = to_host(xp.ascontiguousarray(reo.invert(labels.transpose(meta.transpose_backward))))
            if probs is not None:
                probs = to_host(xp.stack([reo.invert(p.transpose(meta.transpose_backward)) for p in probs]))
            if conf is not None:
                conf = to_host(xp.ascontiguousarray(reo.invert(conf.transpose(meta.transpose_backward))))
        return Prediction(labels, probs, dict(timer.t), tiles, tuple(net_shape), net_labels, conf)

    def _window_and_labels(self, data, window: WindowConfig, keep, back, crop: CropInfo, full_shape, timer):
        """Sliding window and the way back, streamed: labels (and probabilities, confidence) on the uncropped
        grid."""
        xp, meta, opts = self.xp, self.bundle.meta, self.options
        fast = opts.fast_options
        clock, n_tiles = DeviceClock(xp), [0]

        def network(batch):
            clock.start()
            out = self.backend(batch)
            clock.stop()
            n_tiles[0] += len(batch)
            return out

        from tqdm import tqdm

        t0 = time.perf_counter()
        with tqdm(desc="tiles", unit="tile", disable=None if self.progress else True, leave=False) as bar:  # TTY only
            blocks = sliding_window_blocks(data, network, meta.num_classes, window, keep_tile=keep, progress=bar)
            net_labels = np.zeros(back.in_shape, dtype=np.uint8) if opts.network_labels else None
            if net_labels is not None:
                blocks = _keep_argmax(blocks, net_labels)
            labels = xp.zeros(full_shape, dtype=np.uint8)  # written in place: no paste copy
            conf = None
            if fast and fast.label_upsampling and not opts.probabilities and not opts.confidence and refinable(back):
                labels_refined(blocks, back, out=labels[crop.slices], threads=window.threads)
                probs = None
            else:
                if opts.confidence:  # certain background outside the crop, as the probabilities
                    conf = xp.full(full_shape, 255, dtype=np.uint8)
                rows = ConfidenceRows(conf[crop.slices]) if conf is not None else None
                _, probs = labels_faithful(blocks, back, meta.num_classes, opts.probabilities, out=labels[crop.slices],
                                           on_plane=rows, threads=window.threads)
                if probs is not None:
                    probs = paste_probabilities(probs, crop)
            if timer.sync is not None:
                timer.sync()
        network_s = clock.seconds()
        timer.t["network"] = timer.t.get("network", 0.0) + network_s
        timer.t["blend+resample"] = timer.t.get("blend+resample", 0.0) + time.perf_counter() - t0 - network_s
        return labels, probs, conf, n_tiles[0], net_labels

    def _tile_filter(self, cropped, net_shape, threshold_hu: float):
        """Fast mode: keep only tiles that contain body voxels (above ``threshold_hu``). The image is sampled
        at network resolution (nearest) before the threshold, and every tile's flag is read in one sync."""
        xp = array_module(cropped)
        body = upsample_labels_nearest(cropped, net_shape) > threshold_hu
        padded, _ = pad_to_patch(body[None], self.window.patch_size)
        mask = padded[0]
        pz, py, px = self.window.patch_size
        origins = tile_origins(mask.shape, self.window)
        flags = to_host(xp.stack([mask[z:z + pz, y:y + py, x:x + px].any() for z, y, x in origins]))
        kept = {o for o, f in zip(origins, flags.tolist()) if f}
        return kept.__contains__

    # -- files --------------------------------------------------------------------------------
    def segment_file(self, src: str | Path, outputs: "CaseOutputs | str | Path") -> Prediction:
        """Read ``src``, segment it, write the labels (and what ``outputs`` and the options ask for)."""
        timer = StageTimer()
        with timer("read"):
            vol = load_volume(src, self.options.series_uid, self.options.force)
        return self.segment_volume(vol, outputs, timer)

    def segment_volume(self, vol: Volume, outputs: "CaseOutputs | str | Path", timer: StageTimer | None = None) -> Prediction:
        """Segment a loaded volume and write the labels (and what ``outputs`` and the options ask for)."""
        timer = timer or StageTimer()
        return self.write_outputs(vol, self.predict(vol, timer), outputs, timer)

    def write_outputs(self, vol: Volume, pred: Prediction, outputs: "CaseOutputs | str | Path",
                      timer: StageTimer | None = None) -> Prediction:
        """Write a prediction's labels (and probabilities, statistics, preview as asked) on ``vol``'s grid."""
        outputs = outputs if isinstance(outputs, CaseOutputs) else CaseOutputs(Path(outputs))
        timer = timer or StageTimer()
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
        log.info("%s -> %s: %s", vol.source, outputs.labels, ", ".join(f"{k} {v:.2f}s" for k, v in pred.timings.items()))
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


def _keep_argmax(blocks, out: np.ndarray):
    """Pass ``(z0, z1, logits)`` blocks through, writing their argmax into ``out[z0:z1]`` (on the host)."""
    for z0, z1, blk in blocks:
        out[z0:z1] = to_host(blk.argmax(0))
        yield z0, z1, blk


def paste_probabilities(probs, crop: CropInfo):
    """Cropped (K, ...) probabilities on the uncropped grid: certain background outside the crop, as nnU-Net."""
    xp = array_module(probs)
    full = xp.zeros((probs.shape[0], *crop.shape_before), dtype=probs.dtype)
    full[0] = 1
    full[(slice(None), *crop.slices)] = probs
    return full
