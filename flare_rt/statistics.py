"""Per-structure statistics of a label map on the input grid: volume (mL) and mean/median HU.

One pass over the volume in z-slabs (a few million voxels each) counts every label and gathers the
foreground voxels (label != 0) with their intensities; means come from one weighted
:func:`numpy.bincount` of those, medians from one stable sort of the foreground by label (a radix
sort for uint8) and a partition of each structure's contiguous run. No full-volume temporary is
made besides the slab copies, so a 512x512x300 CT costs a few hundred MB at most (the foreground).

Median convention: numpy's, the mean of the two middle values for an even count. SimpleITK's
``LabelIntensityStatisticsImageFilter`` computes its median from a histogram: with its default 128
bins spread over the image's [min, max] it returns the centre of the bin holding the median (the
mean of two bin centres when the two middle values fall in different bins), so it is off by up to
half a bin, (max - min) / 256. For 8/16-bit integer images with ``SetNumberOfBins(2**bits)`` (65536
for int16 CT) ITK (>= 5.4) centres one bin on every integer and its median equals numpy's exactly.

Output files: one JSON per case (``<name>_statistics.json`` beside the labels by default) and, in
folder mode, one CSV with a row per case; both are written atomically.
"""
from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from .atomic import atomic_path, split_suffix
from .errors import ConfigError
from .labels import STRUCTURE_NAMES

log = logging.getLogger(__name__)

#: Voxels per slab of the counting pass (bounds the temporaries of the slab copies).
SLAB_VOXELS = 1 << 22
STATISTICS_SUFFIX = "_statistics.json"
#: Decimals kept in the written files (0.1 mm^3 of volume; 0.01 HU).
VOLUME_DECIMALS = 4
HU_DECIMALS = 2


def sidecar_path(output: str | Path, tail: str) -> Path:
    """``out/case.nii.gz`` + ``_statistics.json`` → ``out/case_statistics.json`` (same folder)."""
    output = Path(output)
    stem, _ = split_suffix(output)
    return output.with_name(stem + tail)


def default_statistics_path(output: str | Path) -> Path:
    """Where ``--statistics`` without a path writes: beside the label file, ``<name>_statistics.json``."""
    return sidecar_path(output, STATISTICS_SUFFIX)


def _check_labels(labels: np.ndarray, what: str = "labels") -> None:
    if labels.ndim != 3 or labels.size == 0:
        raise ConfigError(f"{what} must be a non-empty 3D (z, y, x) array, got shape {labels.shape}")
    if labels.dtype.kind not in "ui":
        raise ConfigError(f"{what} must be an integer label map, got dtype {labels.dtype}")
    if labels.dtype.kind == "i" and int(labels.min()) < 0:
        raise ConfigError(f"{what} hold negative values (min {int(labels.min())}); label ids are >= 0")


def _slabs(shape: Sequence[int]) -> Iterable[slice]:
    step = max(1, SLAB_VOXELS // max(1, int(shape[1]) * int(shape[2])))
    for z0 in range(0, int(shape[0]), step):
        yield slice(z0, min(z0 + step, int(shape[0])))


def label_counts(labels: np.ndarray) -> np.ndarray:
    """Voxel count of every id 0..max, slab by slab (no full-volume int64 copy as one bincount makes)."""
    labels = np.asarray(labels)
    _check_labels(labels)
    n = int(labels.max()) + 1
    counts = np.zeros(n, dtype=np.int64)
    for zs in _slabs(labels.shape):
        counts += np.bincount(labels[zs].reshape(-1), minlength=n)
    return counts


def _foreground(labels: np.ndarray, image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(counts of every id, labels of the foreground voxels, their intensities), in one slab pass."""
    n = int(labels.max()) + 1
    counts = np.zeros(n, dtype=np.int64)
    fg_labels, fg_values = [], []
    for zs in _slabs(labels.shape):
        lab = labels[zs].reshape(-1)
        counts += np.bincount(lab, minlength=n)
        fg = lab != 0
        fg_labels.append(lab[fg])
        fg_values.append(image[zs].reshape(-1)[fg])
    return counts, np.concatenate(fg_labels), np.concatenate(fg_values)


def structure_statistics(labels: np.ndarray, image: np.ndarray, spacing: Sequence[float],
                         names: Mapping[int, str] = STRUCTURE_NAMES) -> dict[str, dict]:
    """Per structure of ``names`` ({id: name}; id 0, background, is left out): ``id``, ``voxels``,
    ``volume_ml`` (voxels x voxel volume / 1000), ``mean_hu`` and ``median_hu`` of ``image`` over the
    structure (None when the structure is absent, whose volume is then 0). Keys in id order.

    ``labels`` and ``image`` are (z, y, x) arrays on the same grid, ``spacing`` (z, y, x) in mm.
    """
    labels, image = np.asarray(labels), np.asarray(image)
    _check_labels(labels)
    if image.shape != labels.shape:
        raise ConfigError(f"labels {labels.shape} and image {image.shape} must be on the same grid (same shape); "
                          "resample the labels to the image first")
    if image.dtype.kind not in "uif":
        raise ConfigError(f"image must be numeric (HU), got dtype {image.dtype}")
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in map(float, spacing)):
        raise ConfigError(f"spacing must be three positive numbers (z, y, x) in mm, got {tuple(spacing)}")
    voxel_ml = float(np.prod([float(s) for s in spacing])) / 1000.0

    counts, fg_labels, fg_values = _foreground(labels, image)
    sums = np.bincount(fg_labels, weights=fg_values, minlength=counts.size)
    order = np.argsort(fg_labels, kind="stable")  # radix sort: one O(n) pass for uint8 labels
    grouped = fg_values[order]
    del order
    ends = np.cumsum(counts[1:])  # structure k occupies grouped[ends[k-2]:ends[k-1]] (k >= 1)
    starts = ends - counts[1:]

    unnamed = [k for k in range(1, counts.size) if counts[k] and k not in names]
    if unnamed:
        log.warning("label ids %s are present but have no name; they are left out of the statistics", unnamed)

    out: dict[str, dict] = {}
    for k in sorted(names):
        if k == 0:
            continue
        n = int(counts[k]) if k < counts.size else 0
        if n:
            run = grouped[starts[k - 1]:ends[k - 1]]
            mean = float(sums[k] / n)
            median = float(np.median(run, overwrite_input=True))  # partitions the run in place
        else:
            mean = median = None
        out[names[k]] = {"id": int(k), "voxels": n, "volume_ml": n * voxel_ml, "mean_hu": mean, "median_hu": median}
    return out


def _rounded(value: float | None, decimals: int) -> float | None:
    return None if value is None else round(float(value), decimals)


def statistics_report(stats: Mapping[str, Mapping], case: str, spacing: Sequence[float],
                      model: str | None = None) -> dict:
    """The content of ``<name>_statistics.json``: case, model (bundle name, if given), spacing (named
    axes, mm), voxel volume and the structures of :func:`structure_statistics` (rounded: volume to
    0.1 mm^3, HU to 0.01)."""
    sz, sy, sx = (float(s) for s in spacing)
    return {
        "case": case,
        "model": model,
        "spacing_mm": {"x": sx, "y": sy, "z": sz},
        "voxel_volume_ml": sx * sy * sz / 1000.0,
        "structures": {
            name: {
                "id": int(s["id"]),
                "voxels": int(s["voxels"]),
                "volume_ml": round(float(s["volume_ml"]), VOLUME_DECIMALS),
                "mean_hu": _rounded(s["mean_hu"], HU_DECIMALS),
                "median_hu": _rounded(s["median_hu"], HU_DECIMALS),
            }
            for name, s in stats.items()
        },
    }


def write_statistics_json(report: Mapping, path: str | Path) -> Path:
    """Write a :func:`statistics_report` as JSON, atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")
    return path


def read_statistics_json(path: str | Path) -> dict:
    """A report written by :func:`write_statistics_json` (e.g. to build the folder CSV from the JSON
    files that several workers wrote)."""
    path = Path(path)
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: not a readable statistics JSON ({exc})") from exc
    if not isinstance(report, dict) or not isinstance(report.get("structures"), dict) or "case" not in report:
        raise ConfigError(f"{path}: not a flare-rt statistics file (needs 'case' and 'structures')")
    return report


def csv_columns(reports: Sequence[Mapping]) -> list[str]:
    """``case``, then ``<structure>_volume_ml`` and ``<structure>_mean_hu`` per structure (id order)."""
    ids: dict[str, int] = {}
    for report in reports:
        for name, s in report["structures"].items():
            ids.setdefault(name, int(s["id"]))
    columns = ["case"]
    for name in sorted(ids, key=lambda n: (ids[n], n)):
        columns += [f"{name}_volume_ml", f"{name}_mean_hu"]
    return columns


def write_statistics_csv(reports: Iterable[Mapping], path: str | Path) -> Path:
    """One row per case (in the order given) of the reports' volumes and mean HU, atomically; an
    absent structure has volume 0 and an empty mean cell."""
    reports = list(reports)
    columns = csv_columns(reports)
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(columns)
        for report in reports:
            row = {"case": report["case"]}
            for name, s in report["structures"].items():
                row[f"{name}_volume_ml"] = s["volume_ml"]
                row[f"{name}_mean_hu"] = "" if s["mean_hu"] is None else s["mean_hu"]
            writer.writerow([row.get(c, "") for c in columns])
    return path


def write_folder_csv(folder: str | Path, path: str | Path) -> Path:
    """The folder's CSV from every ``*_statistics.json`` in it (so it is complete whichever of several
    workers writes it last), one row per case in name order."""
    files = sorted(Path(folder).glob(f"*{STATISTICS_SUFFIX}"))
    return write_statistics_csv((read_statistics_json(f) for f in files), path)
