"""Preprocessing cache: each case cropped, normalised and resampled to the model's spacing once, with the
functions the runtime uses (:mod:`flare_rt.preprocess`, :mod:`flare_rt.resample`), and a per-class voxel
index for foreground oversampling.

Storage: ``<case>.npz`` (``np.savez_compressed``: image float32, labels uint8, ``locations_<k>`` int32)
and ``<case>.json`` (what it was made from). For training, each case is unpacked once to uncompressed
``<case>.image.npy`` / ``<case>.labels.npy`` that are memory-mapped, so a patch reads only its own
pages instead of decompressing the whole case per patch (nnU-Net v1's scheme).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..atomic import atomic_path
from ..bundle import CTNormalization, ResamplingRule
from ..labels import IGNORE_ID
from ..orientation import NONE, STORED, plan_reorientation
from ..preprocess import compute_new_shape, ct_normalize, nonzero_crop
from ..resample import ResamplePlan, make_plan, resample
from .dataset import CaseEntry, load_case
from .parallel import parallel_map

log = logging.getLogger(__name__)

CACHE_FORMAT = 2  # 2: orientation "none" puts a case stored with permuted axes in axial order
MAX_LOCATIONS = 10_000  # per class, as nnU-Net
MIN_LOCATION_FRACTION = 0.01


@dataclass(frozen=True)
class CacheSpec:
    """What a cached case depends on (besides its files)."""

    spacing: tuple[float, float, float]
    normalization: CTNormalization
    resampling: ResamplingRule = ResamplingRule()
    compute_dtype: str = "float32"  # image resampling arithmetic (nnU-Net: float64)
    orientation: str = "none"  # as the runtime (flare_rt.orientation): "none", "stored" or a code

    def key(self, entry: CaseEntry) -> str:
        files = [(p, os.stat(p).st_size, int(os.stat(p).st_mtime)) for p in (entry.image, entry.label)
                 if p is not None and Path(p).is_file()]
        text = json.dumps([CACHE_FORMAT, asdict(self), files, entry.annotated], sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class PreprocessedCase:
    image: np.ndarray  # (z, y, x) float32, normalised, at the target spacing
    labels: np.ndarray  # (z, y, x) uint8
    locations: dict[int, np.ndarray]  # class -> (n, 3) int32 voxel indices (sampled)


def resample_labels(labels: np.ndarray, plan: ResamplePlan) -> np.ndarray:
    """Label resampling with :func:`flare_rt.resample.resample`: each present class's one-hot mask is
    resampled with the plan's order (nnU-Net's seg resampling: order 1, order_z 0) and the label with
    the largest value wins (a running argmax, so memory stays at two volumes)."""
    if plan.identity:
        return labels.astype(np.uint8, copy=True)
    classes = np.unique(labels)
    if classes.size == 1:
        return np.full(plan.out_shape, classes[0], dtype=np.uint8)
    best = np.full(plan.out_shape, -1.0, dtype=np.float32)
    out = np.zeros(plan.out_shape, dtype=np.uint8)
    for c in classes.tolist():
        p = resample((labels == c)[None].astype(np.float32), plan, out_dtype=np.float32, compute_dtype=np.float32)[0]
        win = p > best
        out[win] = c
        np.maximum(best, p, out=best)
    return out


def class_locations(labels: np.ndarray, seed: int = 1234) -> dict[int, np.ndarray]:
    """nnU-Net's foreground index: up to 10,000 voxels per class (at least 1 % of the class), sampled.
    Ignored voxels are no class: they are never a foreground centre."""
    rng = np.random.default_rng(seed)
    out = {}
    for c in np.unique(labels).tolist():
        if c in (0, IGNORE_ID):
            continue
        where = np.argwhere(labels == c).astype(np.int32)
        n = min(len(where), max(MAX_LOCATIONS, int(np.ceil(len(where) * MIN_LOCATION_FRACTION))))
        out[int(c)] = where[np.sort(rng.choice(len(where), n, replace=False))] if n < len(where) else where
    return out


def preprocess_arrays(image: np.ndarray, spacing: Sequence[float], labels: np.ndarray | None,
                      spec: CacheSpec, direction: Sequence[float] | None = None) -> PreprocessedCase:
    """Reorient as the runtime does (needs the SimpleITK ``direction``; without one, ``none`` and ``stored``
    keep the array order), crop to the non-zero box, normalise and resample to ``spec.spacing``: the
    runtime's preprocessing, step by step."""
    if direction is not None or spec.orientation not in (NONE, STORED):
        reo = plan_reorientation(direction, spec.orientation)
        image, spacing = reo.apply(image), reo.spacing(spacing)
        labels = None if labels is None else reo.apply(labels)
    crop = nonzero_crop(image)
    data = ct_normalize(image[crop.slices], spec.normalization)[None]
    new_shape = compute_new_shape(crop.shape_after, spacing, spec.spacing)
    plan = make_plan(crop.shape_after, new_shape, spacing, spec.spacing, spec.resampling, probabilities=False)
    data = resample(data, plan, out_dtype=np.float32, compute_dtype=np.dtype(spec.compute_dtype).type)[0]
    if labels is None:
        return PreprocessedCase(data, np.zeros(data.shape, np.uint8), {})
    seg_plan = make_plan(crop.shape_after, new_shape, spacing, spec.spacing, spec.resampling, probabilities=True)
    seg = resample_labels(labels[crop.slices], seg_plan)
    return PreprocessedCase(data, seg, class_locations(seg))


def _paths(cache_dir: Path, case_id: str) -> dict[str, Path]:
    return {"npz": cache_dir / f"{case_id}.npz", "meta": cache_dir / f"{case_id}.json",
            "image": cache_dir / f"{case_id}.image.npy", "labels": cache_dir / f"{case_id}.labels.npy"}


def is_cached(cache_dir: Path, entry: CaseEntry, spec: CacheSpec) -> bool:
    p = _paths(cache_dir, entry.id)
    if not (p["npz"].is_file() and p["meta"].is_file()):
        return False
    try:
        return json.loads(p["meta"].read_text()).get("key") == spec.key(entry)
    except (json.JSONDecodeError, OSError):
        return False


def cache_case(job: tuple[CaseEntry, CacheSpec, str]) -> str:
    """Preprocess one case into ``cache_dir`` (atomic: a crash leaves no half-written case)."""
    entry, spec, cache_dir = job
    cache = Path(cache_dir)
    volume, labels = load_case(entry)
    case = preprocess_arrays(volume.array, volume.spacing, labels, spec, volume.direction)
    p = _paths(cache, entry.id)
    for stale in (p["image"], p["labels"]):
        stale.unlink(missing_ok=True)
    with atomic_path(p["npz"]) as tmp:
        np.savez_compressed(tmp, image=case.image, labels=case.labels,
                            **{f"locations_{k}": v for k, v in case.locations.items()})
    meta = {"id": entry.id, "key": spec.key(entry), "shape": list(case.image.shape),
            "classes": sorted(case.locations), "annotated": list(entry.annotated),
            "source_spacing": list(volume.spacing), "spacing": list(spec.spacing)}
    p["meta"].write_text(json.dumps(meta, indent=1) + "\n")
    return entry.id


def build_cache(entries: Sequence[CaseEntry], spec: CacheSpec, cache_dir: str | Path, workers: int = 1,
                progress: bool = True) -> Path:
    """Preprocess every case not yet cached with ``spec`` (resumable: finished cases are skipped)."""
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    todo = [e for e in entries if not is_cached(cache, e, spec)]
    if len(todo) < len(entries):
        log.info("cache %s: %d of %d cases already done", cache, len(entries) - len(todo), len(entries))
    if todo:
        parallel_map(cache_case, [(e, spec, str(cache)) for e in todo], workers, "preprocess", progress)
    return cache


@dataclass(frozen=True)
class CachedCase:
    """A cached case opened for sampling: memory-mapped arrays and the class locations."""

    id: str
    image: np.ndarray  # (z, y, x) float32 memmap
    labels: np.ndarray  # (z, y, x) uint8 memmap
    locations: dict[int, np.ndarray]
    annotated: tuple[int, ...]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.image.shape)  # type: ignore[return-value]


def unpack(cache_dir: str | Path, case_id: str) -> None:
    """Write the uncompressed ``.npy`` copies of a cached case if missing or older than its ``.npz``."""
    p = _paths(Path(cache_dir), case_id)
    npz_time = p["npz"].stat().st_mtime
    with np.load(p["npz"]) as z:
        for key in ("image", "labels"):
            if not p[key].is_file() or p[key].stat().st_mtime < npz_time:
                with atomic_path(p[key]) as tmp:  # unique per process: concurrent ranks
                    np.save(tmp, z[key])


def open_case(cache_dir: str | Path, case_id: str, annotated: Sequence[int]) -> CachedCase:
    """Open a cached case (unpacking it first when needed)."""
    cache = Path(cache_dir)
    unpack(cache, case_id)
    p = _paths(cache, case_id)
    with np.load(p["npz"]) as z:
        locations = {int(k.split("_")[1]): z[k] for k in z.files if k.startswith("locations_")}
    return CachedCase(case_id, np.load(p["image"], mmap_mode="r"), np.load(p["labels"], mmap_mode="r"),
                      locations, tuple(int(a) for a in annotated))
