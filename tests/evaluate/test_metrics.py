"""FLARE rules on hand-built label maps with known answers."""
from __future__ import annotations

import math

import numpy as np
import pytest

from flare_rt.errors import ConfigError, InputImageError
from flare_rt.evaluate import evaluate_case
from flare_rt.evaluate.metrics import (
    FLARE23_DSC_CUTOFF,
    CaseResult,
    ClassScore,
    EvaluationOptions,
    class_box,
    nsd_margin,
    round4,
    score_case,
    summarize,
)
from flare_rt.evaluate.reference import reference_score_case
from flare_rt.evaluate.surface import surface_dice
from flare_rt.labels import ORGAN_IDS, TUMOR_ID

LIVER, SPLEEN, AORTA, IVC, ESOPHAGUS = 1, 3, 5, 6, 10


def assert_matches_reference(result: CaseResult, gt, pred, spacing, **kw):
    expected = reference_score_case(gt, pred, spacing, **kw)
    for s in result.scores:
        e_dsc, e_nsd = expected[s.class_id]
        assert s.dsc == pytest.approx(e_dsc, abs=1e-12, nan_ok=True), s
        assert s.nsd == pytest.approx(e_nsd, abs=1e-12, nan_ok=True), s


def cuboid(shape, lo, hi, label):
    out = np.zeros(shape, np.uint8)
    out[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = label
    return out


def test_cuboid_shift_dsc_is_exact():
    spacing = (0.8, 0.8, 2.5)
    gt = cuboid((30, 20, 12), (5, 4, 2), (25, 14, 9), LIVER)  # 20 voxels along x
    for k in range(0, 6):
        pred = np.roll(gt, k, axis=0)
        result = evaluate_case(pred, gt, spacing)
        assert result.score(LIVER).dsc == round4((20 - k) / 20)
        # x shift of k * 0.8 mm against the liver tolerance of 5 mm
        if k * 0.8 <= 5.0:
            assert result.score(LIVER).nsd == 1.0
        assert_matches_reference(result, gt, pred, spacing)


@pytest.mark.parametrize("shift", [1, 2, 3, 4])
def test_sphere_shift_dsc_from_voxel_counts_and_nsd(shift):
    spacing = (0.9, 0.9, 1.5)
    shape, center, radius = (40, 40, 26), np.array([20.0, 20.0, 13.0]), 9.0  # mm
    grid = np.indices(shape).reshape(3, -1).T * spacing
    inside = np.linalg.norm(grid - center * spacing, axis=1) <= radius
    shifted = np.linalg.norm(grid - (center + [0, shift, 0]) * spacing, axis=1) <= radius
    gt = np.where(inside.reshape(shape), SPLEEN, 0).astype(np.uint8)
    pred = np.where(shifted.reshape(shape), SPLEEN, 0).astype(np.uint8)
    result = evaluate_case(pred, gt, spacing)
    expected = 2 * np.count_nonzero(inside & shifted) / (inside.sum() + shifted.sum())
    assert result.score(SPLEEN).dsc == round4(expected)
    if shift * 0.9 < 3.0:  # spleen tolerance 3 mm
        assert result.score(SPLEEN).nsd == 1.0
    else:
        assert result.score(SPLEEN).nsd < 1.0
    assert_matches_reference(result, gt, pred, spacing)


def test_empty_and_one_sided_classes():
    gt = cuboid((12, 12, 12), (2, 2, 2), (6, 6, 6), LIVER)
    gt[8:10, 8:10, 8:10] = SPLEEN
    pred = cuboid((12, 12, 12), (2, 2, 2), (6, 6, 6), LIVER)
    pred[1:3, 8:10, 1:3] = IVC  # predicted where the GT has none
    result = evaluate_case(pred, gt, (1.0, 1.0, 1.0))
    assert (result.score(LIVER).dsc, result.score(LIVER).nsd) == (1.0, 1.0)
    assert (result.score(SPLEEN).dsc, result.score(SPLEEN).nsd) == (0.0, 0.0)  # GT only
    assert (result.score(IVC).dsc, result.score(IVC).nsd) == (0.0, 0.0)  # prediction only
    for absent in (2, 4, 7, 8, 9, 11, 12, 13, TUMOR_ID):  # empty in both
        assert (result.score(absent).dsc, result.score(absent).nsd) == (1.0, 1.0)
    assert [s.class_id for s in result.scores] == list(range(1, 15))


def disc_on_slices(shape, z_lo, z_hi, label):
    out = np.zeros(shape, np.uint8)
    xx, yy = np.indices(shape[:2])
    disc = (xx - 8) ** 2 + (yy - 8) ** 2 <= 16
    for z in range(z_lo, z_hi + 1):
        out[:, :, z][disc] = label
    return out


@pytest.mark.parametrize("label", [AORTA, IVC, ESOPHAGUS])
def test_zrange_cut_default_drops_the_top_gt_slice(label):
    shape, spacing = (16, 16, 12), (1.0, 1.0, 3.5)
    gt = disc_on_slices(shape, 3, 7, label)  # GT on slices 3..7
    pred = disc_on_slices(shape, 2, 6, label)  # prediction one slice lower
    official = evaluate_case(pred, gt, spacing)
    # official slice [3:7] keeps slices 3..6 of both: identical masks
    assert (official.score(label).dsc, official.score(label).nsd) == (1.0, 1.0)
    inclusive = evaluate_case(pred, gt, spacing, EvaluationOptions(inclusive_zrange=True))
    # [3:8]: GT 5 slices, prediction 4 of them; the GT's top slice is 3.5 mm > 2-3 mm away
    assert inclusive.score(label).dsc == round4(2 * 4 / 9)
    assert inclusive.score(label).nsd < 1.0
    assert_matches_reference(official, gt, pred, spacing)
    assert_matches_reference(inclusive, gt, pred, spacing, inclusive_zrange=True)


def test_zrange_cut_only_for_aorta_ivc_esophagus():
    shape, spacing = (16, 16, 12), (1.0, 1.0, 3.0)
    gt, pred = disc_on_slices(shape, 3, 7, LIVER), disc_on_slices(shape, 2, 6, LIVER)
    for inclusive in (False, True):
        result = evaluate_case(pred, gt, spacing, EvaluationOptions(inclusive_zrange=inclusive))
        assert result.score(LIVER).dsc == 0.8  # 2 * 4 / (5 + 5), no cut


def test_zrange_cut_removes_prediction_outside_gt_range():
    shape, spacing = (16, 16, 12), (1.0, 1.0, 1.0)
    gt = disc_on_slices(shape, 4, 8, AORTA)
    pred = disc_on_slices(shape, 0, 11, AORTA)  # far longer than the GT
    result = evaluate_case(pred, gt, spacing)
    assert (result.score(AORTA).dsc, result.score(AORTA).nsd) == (1.0, 1.0)


def test_single_slice_gt_is_nan_officially_and_scored_inclusive():
    shape, spacing = (16, 16, 8), (1.0, 1.0, 2.0)
    gt = disc_on_slices(shape, 4, 4, AORTA)
    official = evaluate_case(gt.copy(), gt, spacing)
    assert math.isnan(official.score(AORTA).dsc) and math.isnan(official.score(AORTA).nsd)
    inclusive = evaluate_case(gt.copy(), gt, spacing, EvaluationOptions(inclusive_zrange=True))
    assert (inclusive.score(AORTA).dsc, inclusive.score(AORTA).nsd) == (1.0, 1.0)
    assert_matches_reference(official, gt, gt, spacing)


def test_dsc_cutoff_default_and_flare23():
    shape, spacing = (40, 12, 12), (1.0, 1.0, 1.0)
    gt = cuboid(shape, (2, 2, 2), (22, 10, 10), LIVER)  # 20 voxels along x
    pred = np.roll(gt, 17, axis=0)  # overlap 3 of 20: DSC 0.15
    default = evaluate_case(pred, gt, spacing)
    assert default.score(LIVER).dsc == 0.15 and default.score(LIVER).nsd == 0.0
    flare23 = evaluate_case(pred, gt, spacing, EvaluationOptions(dsc_cutoff=FLARE23_DSC_CUTOFF))
    assert flare23.score(LIVER).dsc == 0.15
    raw = surface_dice(gt == LIVER, pred == LIVER, spacing, 5.0)
    assert flare23.score(LIVER).nsd == round4(raw) and raw > 0
    assert_matches_reference(flare23, gt, pred, spacing, dsc_cutoff=0.1)
    # DSC exactly at the cut-off is not below it: NSD is computed
    at_cutoff = evaluate_case(np.roll(gt, 16, axis=0), gt, spacing)
    assert at_cutoff.score(LIVER).dsc == 0.2 and at_cutoff.score(LIVER).nsd > 0


def test_values_rounded_to_four_decimals():
    spacing = (0.7, 0.7, 1.3)
    gt = cuboid((20, 20, 20), (2, 2, 2), (5, 9, 9), LIVER)  # 3 voxels along x
    pred = np.roll(gt, 1, axis=0)
    pred[10:14, 12:15, 3:6] = LIVER
    result = evaluate_case(pred, gt, spacing)
    raw_dsc = 2 * np.count_nonzero((gt == 1) & (pred == 1)) / (np.count_nonzero(gt == 1) + np.count_nonzero(pred == 1))
    raw_nsd = surface_dice(gt == 1, pred == 1, spacing, 5.0)
    assert result.score(LIVER).dsc == round(raw_dsc, 4) != raw_dsc
    assert result.score(LIVER).nsd == round(raw_nsd, 4) != raw_nsd
    assert round4(2 / 3) == 0.6667 and round4(0.99995) == 1.0


def make_case(name, dsc_by_class, nsd_by_class=None):
    nsd_by_class = nsd_by_class or dsc_by_class
    return CaseResult(
        name, tuple(ClassScore(c, dsc_by_class.get(c, 1.0), nsd_by_class.get(c, 1.0)) for c in range(1, 15))
    )


def test_organ_mean_is_mean_of_13_class_means_and_tumour_apart():
    a = make_case("a", {1: 0.9, 5: float("nan"), 14: 0.0})
    b = make_case("b", {1: 0.7, 5: 0.5, 14: 0.4})
    summary = summarize([a, b])
    liver = summary.classes[0]
    assert (liver.dsc_mean, liver.dsc_std) == (0.8, 0.1)
    aorta = summary.classes[4]
    assert aorta.dsc_mean == 0.5 and aorta.n_nan == 2  # NaN skipped (DSC and NSD)
    class_means = [0.8, 1, 1, 1, 0.5, 1, 1, 1, 1, 1, 1, 1, 1]
    assert summary.organ_dsc == round4(np.mean(class_means)) == 0.9462
    # pooling the 25 non-NaN organ values would give another number: 0.944
    assert round4(np.mean([0.9, 0.7, 0.5] + [1.0] * 22)) != summary.organ_dsc
    assert summary.tumor is not None and summary.tumor.dsc_mean == 0.2
    assert summary.tumor.class_id == TUMOR_ID and len(ORGAN_IDS) == 13
    assert summary.n_cases == 2 and summary.missing == ()


def test_class_means_are_rounded_before_the_organ_mean():
    # class means 0.33335 (-> 0.3334 or 0.3333 by numpy's rounding) and 1: the organ mean uses the
    # rounded class means, as the official script does
    a = make_case("a", {1: 0.3333})
    b = make_case("b", {1: 0.3334})
    summary = summarize([a, b])
    assert summary.classes[0].dsc_mean == round4(np.mean([0.3333, 0.3334]))
    assert summary.organ_dsc == round4((summary.classes[0].dsc_mean + 12) / 13)


def test_missing_predictions_listed_in_summary():
    gt = cuboid((8, 8, 8), (1, 1, 1), (4, 4, 4), LIVER)
    missing = score_case(gt, np.zeros_like(gt), (1, 1, 1), case="m", missing_prediction=True)
    summary = summarize([missing, make_case("ok", {})])
    assert summary.missing == ("m",)
    assert missing.score(LIVER).dsc == 0.0 and missing.score(SPLEEN).dsc == 1.0


def test_box_margin_and_clipping():
    assert nsd_margin(5.0, (0.8, 0.8, 2.5)) == (9, 9, 4)
    assert nsd_margin(2.0, (1.0, 1.0, 1.0)) == (4, 4, 4)
    occupied = (slice(3, 10), slice(0, 4), slice(5, 6))
    region = (slice(0, 12), slice(0, 100), slice(4, 7))  # a z slab
    assert class_box(occupied, (4, 4, 4), region) == (slice(0, 12), slice(0, 8), slice(4, 7))


def test_bad_inputs_raise_typed_errors():
    gt = np.zeros((4, 4, 4), np.uint8)
    with pytest.raises(InputImageError, match="shape"):
        evaluate_case(np.zeros((4, 4, 5), np.uint8), gt, (1, 1, 1))
    with pytest.raises(InputImageError, match="integer"):
        evaluate_case(np.zeros((4, 4, 4), np.float32), gt, (1, 1, 1))
    with pytest.raises(InputImageError, match="spacing"):
        evaluate_case(gt, gt, (1, 0, 1))
    with pytest.raises(ConfigError, match="dsc_cutoff"):
        EvaluationOptions(dsc_cutoff=2)
    with pytest.raises(ConfigError, match="class_ids"):
        EvaluationOptions(class_ids=(0, 15))
