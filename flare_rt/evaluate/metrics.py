"""FLARE23 DSC and NSD per case and class, with every rule of the official script, and their means.

Arrays are label maps indexed ``(x, y, z)`` like nibabel's (the official script reads with
nibabel), spacing is ``(x, y, z)`` in mm from the ground-truth header; "z" is the third voxel axis
of the file. Rules (``shared/FLARE.md``, "Official accuracy metrics"):

* ground truth and prediction both empty for a class: DSC = NSD = 1; exactly one empty: 0 and 0
  (decided on the whole volumes, before any z cut);
* aorta, IVC and oesophagus (``ZRANGE_CUT_IDS``): both masks are cut to the ground truth's z-range
  first. The official slice ``[:, :, z_min:z_max]`` drops the top ground-truth slice; that is the
  default so numbers match the challenge, ``inclusive_zrange`` keeps it. A class whose ground
  truth is one slice thick is empty after the official cut: the script then gets DSC = NSD = NaN
  (0 / 0), reproduced here, and the means skip NaN with a warning;
* NSD = 0 when DSC < 0.2 (0.1 during FLARE23: ``FLARE23_DSC_CUTOFF``);
* per-case values rounded to 4 decimals; class mean = mean over cases rounded to 4 decimals;
  organ DSC/NSD = mean of the 13 organ class means, rounded; the tumour is reported on its own.

NSD is computed on the bounding box of the two masks of a class (plus a margin) instead of the
whole volume; :func:`class_box` explains why that gives identical numbers.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from flare_rt.errors import ConfigError, InputImageError
from flare_rt.evaluate.surface import surface_dice
from flare_rt.labels import NAMES, NSD_TOLERANCE_MM, ORGAN_IDS, TUMOR_ID, ZRANGE_CUT_IDS

log = logging.getLogger(__name__)

Spacing = tuple[float, float, float]
Box = tuple[slice, slice, slice]

DEFAULT_DSC_CUTOFF = 0.2
FLARE23_DSC_CUTOFF = 0.1  # the cut-off the FLARE23 challenge script used
ALL_CLASS_IDS: tuple[int, ...] = tuple(sorted(NSD_TOLERANCE_MM))  # 1..14


@dataclass(frozen=True)
class EvaluationOptions:
    """How cases are scored; the defaults are the official FLARE DSC/NSD rules."""

    dsc_cutoff: float = DEFAULT_DSC_CUTOFF  # NSD := 0 when DSC < dsc_cutoff (FLARE23 used 0.1)
    inclusive_zrange: bool = False  # keep the top GT slice the official z cut drops
    class_ids: tuple[int, ...] = ALL_CLASS_IDS  # classes scored, each with its NSD tolerance

    def __post_init__(self) -> None:
        if not 0.0 <= self.dsc_cutoff <= 1.0:
            raise ConfigError(
                f"dsc_cutoff must be in [0, 1], got {self.dsc_cutoff}; "
                f"use {DEFAULT_DSC_CUTOFF} (default) or {FLARE23_DSC_CUTOFF} (FLARE23)"
            )
        unknown = [c for c in self.class_ids if c not in NSD_TOLERANCE_MM]
        if unknown or not self.class_ids:
            raise ConfigError(
                f"class_ids must be a non-empty subset of {list(ALL_CLASS_IDS)}, got "
                f"{list(self.class_ids)}"
            )


@dataclass(frozen=True)
class ClassScore:
    """DSC and NSD of one class in one case, rounded to 4 decimals (NaN: see module doc)."""

    class_id: int
    dsc: float
    nsd: float

    @property
    def name(self) -> str:
        return NAMES[self.class_id]


@dataclass(frozen=True)
class CaseResult:
    """The scores of one case; ``missing_prediction`` when it was scored as an empty prediction."""

    case: str
    scores: tuple[ClassScore, ...]
    missing_prediction: bool = False

    def score(self, class_id: int) -> ClassScore:
        for s in self.scores:
            if s.class_id == class_id:
                return s
        raise KeyError(f"class {class_id} was not scored in case {self.case}")


def round4(value: float) -> float:
    """The official ``round(x, 4)`` of a numpy float64 (numpy's rounding, NaN kept)."""
    return float(np.round(np.float64(value), 4))


def dice(gt: np.ndarray, pred: np.ndarray) -> float:
    """2|A∩B| / (|A|+|B|) of two boolean masks; NaN when both are empty (as the official code)."""
    total = int(np.count_nonzero(gt)) + int(np.count_nonzero(pred))
    if total == 0:
        return float("nan")
    return 2.0 * int(np.count_nonzero(gt & pred)) / total


def nsd_margin(tolerance_mm: float, spacing: Sequence[float]) -> tuple[int, int, int]:
    """Voxels added around a class's bounding box per axis: ``ceil(tolerance / spacing) + 2``."""
    return tuple(math.ceil(tolerance_mm / s) + 2 for s in spacing)  # type: ignore[return-value]


def class_box(
    occupied: Box, margin: Sequence[int], region: Box
) -> Box:
    """The box NSD is computed on: ``occupied`` (both masks' bounding box) grown by ``margin``,
    clipped to ``region`` (the whole volume, or the z slab of a z-cut class).

    Why this is exact: every voxel of both masks lies in the box, so the voxels outside it are
    background, exactly like the voxels outside the volume, which the official code pads with
    background; a box edge inside the volume therefore sees what the whole volume sees. Every
    surfel is a corner next to a foreground voxel, so all surfels of both masks lie on the box's
    corner grid, and the Euclidean distance transform is exact (not a propagation), so the
    distance from a surfel to the nearest surfel of the other mask is the same in the box as in
    the whole volume. Any box holding both masks would do; the margin (at least the tolerance
    plus two voxels) also keeps every corner within the tolerance of a surfel inside the box.
    """
    return tuple(
        slice(max(o.start - m, r.start), min(o.stop + m, r.stop))
        for o, m, r in zip(occupied, margin, region)
    )  # type: ignore[return-value]


def _union(a: Box, b: Box) -> Box:
    return tuple(slice(min(x.start, y.start), max(x.stop, y.stop)) for x, y in zip(a, b))  # type: ignore[return-value]


def _intersect(a: Box, b: Box) -> Box | None:
    box = tuple(slice(max(x.start, y.start), min(x.stop, y.stop)) for x, y in zip(a, b))
    return None if any(s.start >= s.stop for s in box) else box  # type: ignore[return-value]


def _tight_box(mask: np.ndarray, offset: Box) -> Box | None:
    """Bounding box of ``mask`` (a crop starting at ``offset``) in volume coordinates."""
    found = ndimage.find_objects(mask.view(np.uint8))
    if not found or found[0] is None:
        return None
    return tuple(slice(o.start + f.start, o.start + f.stop) for o, f in zip(offset, found[0]))  # type: ignore[return-value]


def zrange_slab(gt_box: Box, shape: Sequence[int], inclusive: bool) -> Box:
    """The region a z-cut class is scored in: the whole x, y extent and the GT's z-range.

    Official: ``[z_min:z_max]`` with z_max the top GT slice, which is therefore dropped;
    ``inclusive`` gives ``[z_min:z_max + 1]``.
    """
    z_min, z_max = gt_box[2].start, gt_box[2].stop - 1
    return (slice(0, shape[0]), slice(0, shape[1]), slice(z_min, z_max + 1 if inclusive else z_max))


def score_class(
    gt: np.ndarray,
    pred: np.ndarray,
    class_id: int,
    spacing: Spacing,
    options: EvaluationOptions,
    gt_box: Box | None,
    pred_box: Box | None,
) -> ClassScore:
    """DSC and NSD of one class, given the bounding boxes of the class in each label map."""
    if gt_box is None and pred_box is None:
        return ClassScore(class_id, 1.0, 1.0)
    if gt_box is None or pred_box is None:
        return ClassScore(class_id, 0.0, 0.0)
    region: Box = tuple(slice(0, n) for n in gt.shape)  # type: ignore[assignment]
    if class_id in ZRANGE_CUT_IDS:
        region = zrange_slab(gt_box, gt.shape, options.inclusive_zrange)
    candidate = _intersect(_union(gt_box, pred_box), region)
    if candidate is None:  # one-slice GT, empty after the official cut: 0 / 0 in the official code
        log.warning(
            "class %d (%s): the ground truth is one slice thick, empty after the official z cut; "
            "DSC and NSD are NaN as in the official script (use --inclusive-zrange to keep it)",
            class_id, NAMES[class_id],
        )
        return ClassScore(class_id, float("nan"), float("nan"))
    occupied: Box | None = candidate  # the union of the two boxes: tight, unless cut in z
    if class_id in ZRANGE_CUT_IDS:
        occupied = _tight_box((gt[candidate] == class_id) | (pred[candidate] == class_id), candidate)
    assert occupied is not None  # the GT's lowest slice is in the region
    tolerance = NSD_TOLERANCE_MM[class_id]
    box = class_box(occupied, nsd_margin(tolerance, spacing), region)
    g, p = gt[box] == class_id, pred[box] == class_id  # every voxel of both masks in the region
    dsc = dice(g, p)
    nsd = surface_dice(g, p, spacing, tolerance) if not dsc < options.dsc_cutoff else 0.0
    return ClassScore(class_id, round4(dsc), round4(nsd))


def _as_labels(array: np.ndarray, what: str) -> np.ndarray:
    if array.ndim != 3:
        raise InputImageError(f"{what} must be a 3D label map, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.integer):
        raise InputImageError(
            f"{what} must hold integer labels, got dtype {array.dtype}; "
            "cast it after checking the values are whole numbers"
        )
    return array


def check_spacing(spacing: Sequence[float]) -> Spacing:
    values = tuple(float(s) for s in spacing)
    if len(values) != 3 or not all(math.isfinite(s) and s > 0 for s in values):
        raise InputImageError(f"spacing must be three positive numbers in mm, got {tuple(spacing)}")
    return values  # type: ignore[return-value]


def score_case(
    gt: np.ndarray,
    pred: np.ndarray,
    spacing: Sequence[float],
    options: EvaluationOptions = EvaluationOptions(),
    case: str = "case",
    missing_prediction: bool = False,
) -> CaseResult:
    """Score one case: integer label maps indexed (x, y, z), spacing (x, y, z) from the GT."""
    gt, pred = _as_labels(gt, "ground truth"), _as_labels(pred, "prediction")
    if gt.shape != pred.shape:
        raise InputImageError(
            f"case {case}: prediction shape {pred.shape} differs from ground truth shape "
            f"{gt.shape}; resample the prediction onto the ground-truth grid"
        )
    sp = check_spacing(spacing)
    top = max(options.class_ids)
    gt_boxes = ndimage.find_objects(gt, max_label=top)  # one pass for all classes
    pred_boxes = ndimage.find_objects(pred, max_label=top)
    scores = tuple(
        score_class(gt, pred, c, sp, options, gt_boxes[c - 1], pred_boxes[c - 1])
        for c in options.class_ids
    )
    return CaseResult(case, scores, missing_prediction)


# ----------------------------------------------------------------------------------------------
# Means over cases.


@dataclass(frozen=True)
class ClassSummary:
    """Mean (official: rounded to 4 decimals) and population std of one class over the cases."""

    class_id: int
    dsc_mean: float
    dsc_std: float
    nsd_mean: float
    nsd_std: float
    n_cases: int
    n_nan: int  # cases whose value was NaN (skipped by the means)

    @property
    def name(self) -> str:
        return NAMES[self.class_id]


@dataclass(frozen=True)
class Summary:
    """Per class means, the organ means (of the organ class means) and the tumour on its own."""

    classes: tuple[ClassSummary, ...]
    organ_dsc: float
    organ_dsc_std: float  # std over cases of each case's mean over the organs
    organ_nsd: float
    organ_nsd_std: float
    tumor: ClassSummary | None
    n_cases: int
    missing: tuple[str, ...]


def _mean_std(values: np.ndarray) -> tuple[float, float]:
    finite = values[~np.isnan(values)]
    if finite.size == 0:
        return float("nan"), float("nan")
    return round4(finite.mean()), round4(finite.std())


def summarize(results: Iterable[CaseResult]) -> Summary:
    """Class means, organ means and tumour as the official script aggregates them."""
    results = list(results)
    if not results:
        raise ConfigError("no case to summarise: the ground-truth folder has no .nii.gz file")
    class_ids = [s.class_id for s in results[0].scores]
    table = {
        c: (np.array([r.score(c).dsc for r in results]), np.array([r.score(c).nsd for r in results]))
        for c in class_ids
    }
    classes = []
    for c in class_ids:
        dsc, nsd = table[c]
        n_nan = int(np.isnan(dsc).sum() + np.isnan(nsd).sum())
        if n_nan:
            log.warning("class %d (%s): %d NaN value(s) left out of the means", c, NAMES[c], n_nan)
        classes.append(ClassSummary(c, *_mean_std(dsc), *_mean_std(nsd), len(results), n_nan))
    organs = [s for s in classes if s.class_id in ORGAN_IDS]
    organ_ids = [s.class_id for s in organs]

    def organ(metric: int) -> tuple[float, float]:
        if not organs:
            return float("nan"), float("nan")
        means = [s.dsc_mean if metric == 0 else s.nsd_mean for s in organs]
        per_case = np.nanmean(np.stack([table[c][metric] for c in organ_ids]), axis=0)
        return round4(np.nanmean(means)), round4(np.nanstd(per_case))

    (organ_dsc, organ_dsc_std), (organ_nsd, organ_nsd_std) = organ(0), organ(1)
    tumor = next((s for s in classes if s.class_id == TUMOR_ID), None)
    missing = tuple(r.case for r in results if r.missing_prediction)
    return Summary(
        tuple(classes), organ_dsc, organ_dsc_std, organ_nsd, organ_nsd_std, tumor, len(results), missing
    )
