"""Dataset fingerprint as nnU-Net computes it: CT intensity statistics of the labelled foreground (for
CT normalisation), median spacing and median shape after the non-zero crop."""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..bundle import CTNormalization
from ..errors import ConfigError
from ..labels import IGNORE_ID
from ..preprocess import nonzero_crop
from .dataset import CaseEntry, load_case
from .parallel import parallel_map

log = logging.getLogger(__name__)

SAMPLES_PER_CASE = 10_000  # nnU-Net's num_foreground_voxels_for_intensitystats / cases, per case


@dataclass(frozen=True)
class Fingerprint:
    mean: float
    std: float
    percentile_00_5: float
    percentile_99_5: float
    median_spacing: tuple[float, float, float]  # z, y, x mm
    median_shape: tuple[int, int, int]  # after the non-zero crop
    n_cases: int
    cases_key: str  # which cases it was computed on

    def normalization(self) -> CTNormalization:
        return CTNormalization(mean=self.mean, std=self.std, lower=self.percentile_00_5, upper=self.percentile_99_5)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "Fingerprint":
        d = json.loads(text)
        d["median_spacing"], d["median_shape"] = tuple(d["median_spacing"]), tuple(d["median_shape"])
        return cls(**d)


@dataclass(frozen=True)
class CaseStatistics:
    foreground: np.ndarray  # sampled CT values inside the labelled foreground
    spacing: tuple[float, float, float]
    cropped_shape: tuple[int, int, int]


def cases_key(entries: Sequence[CaseEntry]) -> str:
    text = json.dumps(sorted((c.id, c.image, c.label) for c in entries))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def case_statistics(entry: CaseEntry, samples: int = SAMPLES_PER_CASE, seed: int = 1234) -> CaseStatistics:
    """nnU-Net's per-case fingerprint: ``samples`` foreground intensities drawn with replacement."""
    volume, labels = load_case(entry)
    if labels is None:
        raise ConfigError(f"case {entry.id} has no label; the fingerprint uses labelled cases only")
    crop = nonzero_crop(volume.array)
    lab = labels[crop.slices]
    image, fg = volume.array[crop.slices], (lab > 0) & (lab != IGNORE_ID)
    values = image[fg]
    rng = np.random.default_rng(seed)
    picked = rng.choice(values, samples, replace=True) if values.size else np.empty(0, np.float32)
    return CaseStatistics(picked.astype(np.float32), volume.spacing, crop.shape_after)


def fingerprint_from_statistics(stats: Sequence[CaseStatistics], key: str) -> Fingerprint:
    values = np.concatenate([s.foreground for s in stats]) if stats else np.empty(0)
    if values.size == 0:
        raise ConfigError("no labelled foreground voxel in the training cases: CT normalisation needs labels > 0")
    return Fingerprint(
        mean=float(np.mean(values)), std=float(np.std(values)),
        percentile_00_5=float(np.percentile(values, 0.5)), percentile_99_5=float(np.percentile(values, 99.5)),
        median_spacing=tuple(float(v) for v in np.median([s.spacing for s in stats], axis=0)),  # type: ignore[arg-type]
        median_shape=tuple(int(v) for v in np.median([s.cropped_shape for s in stats], axis=0)),  # type: ignore[arg-type]
        n_cases=len(stats), cases_key=key)


def compute_fingerprint(entries: Sequence[CaseEntry], workers: int = 1, progress: bool = True) -> Fingerprint:
    stats = parallel_map(case_statistics, list(entries), workers, "fingerprint", progress)
    fp = fingerprint_from_statistics(stats, cases_key(entries))
    log.info("fingerprint of %d cases: foreground mean %.1f std %.1f, clip [%.1f, %.1f], median spacing %s, "
             "median shape %s", fp.n_cases, fp.mean, fp.std, fp.percentile_00_5, fp.percentile_99_5,
             fp.median_spacing, fp.median_shape)
    return fp


def load_or_compute_fingerprint(path: str | Path, entries: Sequence[CaseEntry], workers: int = 1,
                                progress: bool = True) -> Fingerprint:
    """The fingerprint saved at ``path`` if it was computed on the same cases, else a new one (saved)."""
    path = Path(path)
    if path.is_file():
        try:
            fp = Fingerprint.from_json(path.read_text())
            if fp.cases_key == cases_key(entries):
                return fp
            log.info("%s: computed on other cases; recomputing", path)
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("%s: unreadable (%s); recomputing", path, exc)
    fp = compute_fingerprint(entries, workers, progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(fp.to_json() + "\n")
    return fp
