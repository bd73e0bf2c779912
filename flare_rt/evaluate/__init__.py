"""FLARE23 DSC/NSD evaluation, computed as the official challenge script does.

Python API (the ``flare-rt evaluate`` command is a thin layer over it)::

    from flare_rt.evaluate import EvaluationOptions, evaluate_folders, evaluate_case
    run = evaluate_folders("preds/", "labels/", EvaluationOptions(), workers=2)
    run.summary.organ_dsc, run.summary.tumor, run.results[0].score(1).nsd
    evaluate_case(pred_xyz, gt_xyz, spacing_xyz)     # arrays indexed (x, y, z) like nibabel

Label maps are read with SimpleITK and handled as arrays indexed (x, y, z), the order of nibabel
(which the official script uses), with the spacing (x, y, z) of the ground-truth header.
Rules and rounding: :mod:`flare_rt.evaluate.metrics`; surfaces: :mod:`flare_rt.evaluate.surface`.
"""
from __future__ import annotations

import concurrent.futures
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from flare_rt.errors import ConfigError, InputImageError
from flare_rt.evaluate.metrics import (
    DEFAULT_DSC_CUTOFF,
    FLARE23_DSC_CUTOFF,
    CaseResult,
    ClassScore,
    ClassSummary,
    EvaluationOptions,
    Summary,
    score_case,
    summarize,
)
from flare_rt.evaluate.surface import surface_area_table, surface_dice
from flare_rt.labels import NAMES, TUMOR_ID

if TYPE_CHECKING:
    import SimpleITK as sitk

__all__ = [
    "DEFAULT_DSC_CUTOFF",
    "FLARE23_DSC_CUTOFF",
    "CaseResult",
    "CasePair",
    "ClassScore",
    "ClassSummary",
    "EvaluationOptions",
    "EvaluationRun",
    "Summary",
    "evaluate_case",
    "evaluate_files",
    "evaluate_folders",
    "pair_cases",
    "read_label_map",
    "summarize",
    "surface_area_table",
    "surface_dice",
]

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii.gz", ".nii")
# Geometry tolerances between prediction and ground truth (NIfTI stores them as float32).
SPACING_RTOL = 1e-4
ORIGIN_TOL_VOXELS = 1e-2
DIRECTION_ATOL = 1e-4


def evaluate_case(
    pred: np.ndarray,
    gt: np.ndarray,
    spacing: Sequence[float],
    options: EvaluationOptions = EvaluationOptions(),
    case: str = "case",
) -> CaseResult:
    """Score one case from integer label arrays indexed (x, y, z); spacing (x, y, z) in mm.

    SimpleITK arrays are (z, y, x): pass ``array.transpose(2, 1, 0)`` and ``image.GetSpacing()``.
    """
    return score_case(gt, pred, spacing, options, case)


# ----------------------------------------------------------------------------------------------
# Reading label maps.


@dataclass(frozen=True)
class LabelMap:
    """A label map as scored: integer array indexed (x, y, z), spacing (x, y, z) in mm."""

    array: np.ndarray
    spacing: tuple[float, float, float]
    path: Path


def case_name(path: Path) -> str:
    """``case`` for ``case.nii.gz`` or ``case.nii``."""
    for suffix in NIFTI_SUFFIXES:
        if path.name.endswith(suffix):
            return path.name[: -len(suffix)]
    return path.stem


def _read_image(path: Path) -> sitk.Image:
    from ..io import read_image

    image = read_image(path)  # missing, unreadable and truncated-gzip files raise InputImageError
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputImageError(
            f"label image {path} is {image.GetDimension()}D with "
            f"{image.GetNumberOfComponentsPerPixel()} component(s) per voxel; a 3D scalar label "
            "map is expected (one file per case, one label per voxel)"
        )
    return image


def _label_array(image: sitk.Image, path: Path) -> np.ndarray:
    """The voxels as an integer array indexed (x, y, z), checked to hold whole, non-negative labels."""
    import SimpleITK as sitk

    zyx = sitk.GetArrayFromImage(image)
    if not np.issubdtype(zyx.dtype, np.integer):
        bad = zyx[zyx != np.round(zyx)]
        if bad.size:
            raise InputImageError(
                f"label image {path} holds non-integer values (e.g. {bad.flat[0]!r}): it looks "
                "like probabilities or an intensity image; write integer class labels 0..14"
            )
    low, high = (zyx.min(), zyx.max()) if zyx.size else (0, 0)
    if low < 0 or high > np.iinfo(np.uint16).max:
        raise InputImageError(
            f"label image {path} holds labels {low}..{high}; FLARE labels are 0..14"
        )
    unknown = sorted(set(np.unique(zyx).tolist()) - set(NAMES)) if high > max(NAMES) else []
    if unknown:
        log.warning("%s: labels %s are not FLARE classes and are ignored", path, unknown[:10])
    dtype = np.uint8 if high <= np.iinfo(np.uint8).max else np.uint16
    return zyx.astype(dtype, copy=False).transpose(2, 1, 0)


def read_label_map(path: str | Path) -> LabelMap:
    """Read a label map; :class:`InputImageError` naming the file when it is unusable."""
    path = Path(path)
    image = _read_image(path)
    return LabelMap(_label_array(image, path), tuple(image.GetSpacing()), path)  # type: ignore[arg-type]


def _geometry_mismatch(pred: sitk.Image, gt: sitk.Image) -> str | None:
    """What differs between the grids of two images, or None when they match."""
    if pred.GetSize() != gt.GetSize():
        return f"size {pred.GetSize()} vs {gt.GetSize()}"
    sp_pred, sp_gt = np.array(pred.GetSpacing()), np.array(gt.GetSpacing())
    if not np.allclose(sp_pred, sp_gt, rtol=SPACING_RTOL, atol=0):
        return f"spacing {tuple(sp_pred)} vs {tuple(sp_gt)}"
    origin = np.abs(np.subtract(pred.GetOrigin(), gt.GetOrigin())).max()
    if origin > ORIGIN_TOL_VOXELS * sp_gt.min():
        return f"origin {pred.GetOrigin()} vs {gt.GetOrigin()}"
    if np.abs(np.subtract(pred.GetDirection(), gt.GetDirection())).max() > DIRECTION_ATOL:
        return f"direction {pred.GetDirection()} vs {gt.GetDirection()}"
    return None


def _resample_onto(pred: sitk.Image, gt: sitk.Image) -> sitk.Image:
    """Nearest-neighbour resampling of ``pred`` onto the grid of ``gt`` in physical space."""
    import SimpleITK as sitk

    resampler = sitk.ResampleImageFilter()
    resampler.SetReferenceImage(gt)
    resampler.SetInterpolator(sitk.sitkNearestNeighbor)
    resampler.SetDefaultPixelValue(0)
    resampler.SetOutputPixelType(pred.GetPixelID())
    return resampler.Execute(pred)


def load_case(
    pred_path: Path | None, gt_path: Path, resample_pred: bool = False
) -> tuple[LabelMap, LabelMap | None]:
    """Ground truth and prediction (None when missing) on the same grid, or a typed error."""
    gt_image = _read_image(gt_path)
    gt = LabelMap(_label_array(gt_image, gt_path), tuple(gt_image.GetSpacing()), gt_path)  # type: ignore[arg-type]
    if pred_path is None:
        return gt, None
    pred_image = _read_image(pred_path)
    mismatch = _geometry_mismatch(pred_image, gt_image)
    if mismatch and not resample_pred:
        raise InputImageError(
            f"prediction {pred_path} does not match ground truth {gt_path} ({mismatch}); "
            "write the prediction on the ground-truth grid or pass --resample-pred"
        )
    if mismatch:
        _label_array(pred_image, pred_path)  # validate before resampling
        log.info("%s: resampling the prediction onto the ground-truth grid (%s)", pred_path, mismatch)
        pred_image = _resample_onto(pred_image, gt_image)
    return gt, LabelMap(_label_array(pred_image, pred_path), gt.spacing, pred_path)


def evaluate_files(
    pred: str | Path | None,
    gt: str | Path,
    options: EvaluationOptions = EvaluationOptions(),
    resample_pred: bool = False,
    case: str | None = None,
) -> CaseResult:
    """Score one prediction file against its ground-truth file (``pred=None``: missing, empty)."""
    gt_path = Path(gt)
    name = case or case_name(gt_path)
    gt_map, pred_map = load_case(None if pred is None else Path(pred), gt_path, resample_pred)
    if pred_map is None:
        empty = np.zeros_like(gt_map.array)
        return score_case(gt_map.array, empty, gt_map.spacing, options, name, missing_prediction=True)
    return score_case(gt_map.array, pred_map.array, gt_map.spacing, options, name)


# ----------------------------------------------------------------------------------------------
# Folders, in parallel over cases.


@dataclass(frozen=True)
class CasePair:
    case: str
    gt: Path
    pred: Path | None  # None: no prediction for this ground truth


@dataclass(frozen=True)
class EvaluationRun:
    results: tuple[CaseResult, ...]
    summary: Summary
    options: EvaluationOptions
    unmatched_predictions: tuple[str, ...]  # predictions without a ground truth (ignored)


def _nifti_files(folder: Path) -> dict[str, Path]:
    files = [p for p in sorted(folder.iterdir()) if p.is_file() and p.name.endswith(NIFTI_SUFFIXES)]
    return {case_name(p): p for p in files}


def pair_cases(pred: Path, gt: Path) -> tuple[list[CasePair], list[str]]:
    """Ground-truth cases with their predictions (matched by case name) and unmatched predictions.

    ``pred`` and ``gt`` are two folders or two files.
    """
    if not gt.exists():
        raise InputImageError(f"ground truth {gt} does not exist; pass a label file or folder")
    if gt.is_file():
        if pred.is_dir():
            raise ConfigError(
                f"ground truth {gt} is a file but prediction {pred} is a folder; pass two files "
                "or two folders"
            )
        return [CasePair(case_name(gt), gt, pred)], []
    if not pred.is_dir():
        raise ConfigError(
            f"ground truth {gt} is a folder but prediction {pred} is not a folder; pass two "
            "folders (cases matched by file name) or two files"
        )
    gts, preds = _nifti_files(gt), _nifti_files(pred)
    if not gts:
        raise InputImageError(f"ground-truth folder {gt} holds no .nii.gz or .nii file")
    if not set(gts) & set(preds):  # every case would score 0: a wrong folder or naming, not a result
        found = f"its files: {', '.join(sorted(preds)[:3])}{', ...' if len(preds) > 3 else ''}" if preds \
            else "it holds no .nii.gz or .nii file"
        raise InputImageError(f"prediction folder {pred}: no prediction is named like a ground-truth case "
                              f"(e.g. {next(iter(sorted(gts)))}.nii.gz); {found}")
    pairs = [CasePair(case, path, preds.get(case)) for case, path in gts.items()]
    return pairs, sorted(set(preds) - set(gts))


def _evaluate_pair(pair: CasePair, options: EvaluationOptions, resample_pred: bool) -> CaseResult:
    return evaluate_files(pair.pred, pair.gt, options, resample_pred, pair.case)


def evaluate_folders(
    pred: str | Path,
    gt: str | Path,
    options: EvaluationOptions = EvaluationOptions(),
    workers: int = 1,
    resample_pred: bool = False,
) -> EvaluationRun:
    """Score every ground-truth case against the prediction of the same name.

    A missing prediction is scored as an empty one and listed in the summary. ``workers`` > 1
    scores cases in that many processes. The first unusable file stops the run with a typed error.
    """
    if workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}")
    pairs, unmatched = pair_cases(Path(pred), Path(gt))
    missing = [p.case for p in pairs if p.pred is None]
    if missing:
        log.warning(
            "%d case(s) without a prediction, scored as empty predictions: %s",
            len(missing), ", ".join(missing),
        )
    if unmatched:
        log.warning("%d prediction(s) without a ground truth, ignored: %s", len(unmatched), ", ".join(unmatched))
    log.info("scoring %d case(s) with %d worker(s)", len(pairs), workers)
    results = _run_pairs(pairs, options, resample_pred, workers)
    return EvaluationRun(tuple(results), summarize(results), options, tuple(unmatched))


def _run_pairs(
    pairs: list[CasePair], options: EvaluationOptions, resample_pred: bool, workers: int
) -> list[CaseResult]:
    if workers == 1 or len(pairs) == 1:
        return [_logged(_evaluate_pair(p, options, resample_pred)) for p in pairs]
    with concurrent.futures.ProcessPoolExecutor(max_workers=min(workers, len(pairs))) as pool:
        futures = [pool.submit(_evaluate_pair, p, options, resample_pred) for p in pairs]
        try:
            for future in concurrent.futures.as_completed(futures):
                _logged(future.result())
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        return [f.result() for f in futures]


def _logged(result: CaseResult) -> CaseResult:
    organ = [s for s in result.scores if s.class_id != TUMOR_ID]
    log.info(
        "%s: mean organ DSC %.4f, NSD %.4f%s",
        result.case,
        np.nanmean([s.dsc for s in organ]) if organ else float("nan"),
        np.nanmean([s.nsd for s in organ]) if organ else float("nan"),
        " (missing prediction, scored as empty)" if result.missing_prediction else "",
    )
    return result
