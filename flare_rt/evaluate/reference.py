"""Whole-volume reference of the FLARE DSC/NSD, for tests and benchmarks only.

Deliberately plain: every class is compared on full-volume masks, the neighbour codes come from
``scipy.ndimage.correlate`` with DeepMind's kernel on the whole volume (padded with one background
voxel at the high end of each axis), and the distance transforms run on the whole volume. It
shares only the neighbour-code area table with the fast path (tested on its own in
``tests/evaluate/test_surface.py``). Arrays are indexed (x, y, z) like nibabel's.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from flare_rt.evaluate.surface import surface_area_table
from flare_rt.labels import NSD_TOLERANCE_MM, ZRANGE_CUT_IDS

KERNEL = np.array([[[128, 64], [32, 16]], [[8, 4], [2, 1]]])


def reference_dice(gt: np.ndarray, pred: np.ndarray) -> float:
    total = gt.sum() + pred.sum()
    if total == 0:
        return float("nan")
    return float(2 * (gt & pred).sum() / total)


def reference_surface_dice(
    gt: np.ndarray, pred: np.ndarray, spacing: Sequence[float], tolerance_mm: float
) -> float:
    """NSD with whole-volume neighbour codes and distance transforms."""
    spacing = tuple(float(s) for s in spacing)
    areas = surface_area_table(spacing)
    pad = ((0, 1), (0, 1), (0, 1))
    codes_gt = ndimage.correlate(np.pad(gt.astype(np.uint8), pad), KERNEL, mode="constant", cval=0)
    codes_pred = ndimage.correlate(np.pad(pred.astype(np.uint8), pad), KERNEL, mode="constant", cval=0)
    border_gt = (codes_gt != 0) & (codes_gt != 255)
    border_pred = (codes_pred != 0) & (codes_pred != 255)
    if border_gt.any():
        dist_gt = ndimage.distance_transform_edt(~border_gt, sampling=spacing)
    else:
        dist_gt = np.full(border_gt.shape, np.inf)
    if border_pred.any():
        dist_pred = ndimage.distance_transform_edt(~border_pred, sampling=spacing)
    else:
        dist_pred = np.full(border_pred.shape, np.inf)
    area_gt, area_pred = areas[codes_gt[border_gt]], areas[codes_pred[border_pred]]
    gt_to_pred, pred_to_gt = dist_pred[border_gt], dist_gt[border_pred]
    overlap = area_gt[gt_to_pred <= tolerance_mm].sum() + area_pred[pred_to_gt <= tolerance_mm].sum()
    total = area_gt.sum() + area_pred.sum()
    return float(overlap / total) if total > 0 else float("nan")


def reference_score_case(
    gt: np.ndarray,
    pred: np.ndarray,
    spacing: Sequence[float],
    dsc_cutoff: float = 0.2,
    inclusive_zrange: bool = False,
    class_ids: Sequence[int] = tuple(range(1, 15)),
) -> dict[int, tuple[float, float]]:
    """``{class id: (DSC, NSD)}`` rounded to 4 decimals, following the official script step by step."""
    out = {}
    for i in class_ids:
        gt_i, pred_i = gt == i, pred == i
        if not gt_i.any() and not pred_i.any():
            out[i] = (1.0, 1.0)
            continue
        if not gt_i.any() or not pred_i.any():
            out[i] = (0.0, 0.0)
            continue
        if i in ZRANGE_CUT_IDS:
            z = np.nonzero(gt_i.any(axis=(0, 1)))[0]
            z_top = z.max() + 1 if inclusive_zrange else z.max()
            gt_i, pred_i = gt_i[:, :, z.min() : z_top], pred_i[:, :, z.min() : z_top]
        dsc = reference_dice(gt_i, pred_i)
        if dsc < dsc_cutoff:
            nsd = 0.0
        elif np.isnan(dsc):
            nsd = float("nan")
        else:
            nsd = reference_surface_dice(gt_i, pred_i, spacing, NSD_TOLERANCE_MM[i])
        out[i] = (float(np.round(dsc, 4)), float(np.round(nsd, 4)))
    return out
