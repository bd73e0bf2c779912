"""Preprocessing and resampling against nnU-Net v2's own functions (bit-exact where nnU-Net is
deterministic), on random arrays and on the real CT. nnunetv2 is the fidelity peer (the dev extra)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from flare_rt.bundle import CTNormalization, ResamplingRule
from flare_rt.preprocess import compute_new_shape, ct_normalize, nonzero_crop, paste
from flare_rt.resample import make_plan, resample, separate_z_axis

nn_resampling = pytest.importorskip("nnunetv2.preprocessing.resampling.default_resampling",
                                    reason="nnunetv2 is the fidelity peer: pip install -e '.[dev]'")

CASES = [  # shape, spacing, target spacing
    ((20, 60, 50), (3.0, 0.8, 0.8), (4.0, 1.2, 1.2)),  # separate z (target anisotropic), downsample z
    ((11, 60, 50), (5.0, 0.7, 0.7), (4.0, 1.2, 1.2)),  # separate z, upsample z
    ((20, 31, 33), (1.0, 1.0, 1.0), (1.2, 1.3, 0.9)),  # isotropic: 3D resize
    ((14, 40, 30), (1.0, 3.5, 1.0), (1.0, 1.0, 1.0)),  # low-res axis is y
]


@pytest.mark.parametrize("shape,spacing,target", CASES)
@pytest.mark.parametrize("probabilities", [False, True])
def test_resample_bit_exact_with_nnunet(shape, spacing, target, probabilities):
    rng = np.random.default_rng(0)
    data = rng.standard_normal((2, *shape)).astype(np.float32)
    new_shape = compute_new_shape(shape, spacing, target)
    assert list(new_shape) == list(nn_resampling.compute_new_shape(shape, spacing, target))
    order, order_z = (1, 0) if probabilities else (3, 0)
    ref = nn_resampling.resample_data_or_seg_to_shape(data, new_shape, spacing, target, False, order, order_z, None)
    plan = make_plan(shape, new_shape, spacing, target, ResamplingRule(), probabilities)
    out = resample(data, plan)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert np.array_equal(out, ref)


def test_resample_order_z1_matches_nnunet():
    rng = np.random.default_rng(1)
    data = rng.standard_normal((1, 9, 30, 20)).astype(np.float32)
    sp, tgt = (5.0, 1.0, 1.0), (2.0, 1.0, 1.0)
    new_shape = compute_new_shape(data.shape[1:], sp, tgt)
    ref = nn_resampling.resample_data_or_seg_to_shape(data, new_shape, sp, tgt, False, 3, 1, None)
    plan = make_plan(data.shape[1:], new_shape, sp, tgt, ResamplingRule(data_order_z=1), False)
    np.testing.assert_allclose(resample(data, plan), ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("spacing,target", [((3, 1, 1), (4, 1.2, 1.2)), ((1, 1, 1), (1, 1, 1)),
                                            ((0.24, 1.25, 1.25), (1, 1, 1)), ((1, 1, 5), (1, 1, 1))])
def test_separate_z_rule_matches_nnunet(spacing, target):
    do, axis = nn_resampling.determine_do_sep_z_and_axis(None, spacing, target)
    assert separate_z_axis(spacing, target, ResamplingRule()) == (axis if do else None)


def test_ct_normalization_bit_exact():
    norm_mod = pytest.importorskip("nnunetv2.preprocessing.normalization.default_normalization_schemes")
    props = {"mean": 30.9, "std": 69.7, "percentile_00_5": -508.1, "percentile_99_5": 78.0}
    img = np.random.default_rng(2).integers(-1024, 1500, (5, 20, 20)).astype(np.int16)
    ref = norm_mod.CTNormalization(False, props).run(img.astype(np.float32).copy())
    ours = ct_normalize(img, CTNormalization(mean=30.9, std=69.7, lower=-508.1, upper=78.0))
    assert ours.dtype == np.float32 and np.array_equal(ours, ref)


def test_nonzero_crop_matches_nnunet():
    crop_mod = pytest.importorskip("nnunetv2.preprocessing.cropping.cropping")
    img = np.zeros((12, 30, 40), dtype=np.float32)
    img[2:9, 5:25, 7:31] = np.random.default_rng(3).standard_normal((7, 20, 24))
    img[4, 10:12, 10:12] = 0  # holes do not change the box
    _, _, bbox = crop_mod.crop_to_nonzero(img[None])
    crop = nonzero_crop(img)
    assert [list(b) for b in crop.bbox] == [list(b) for b in bbox]
    assert crop.shape_after == (7, 20, 24)
    assert np.array_equal(paste(img[crop.slices], crop), img)


def test_full_preprocessing_bit_exact_on_real_ct(shared_data, demo_nnunet_dir):
    """Read + crop + normalise + resample of a real CT equals nnU-Net's DefaultPreprocessor.run_case."""
    import SimpleITK as sitk
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans = json.loads((demo_nnunet_dir / "plans.json").read_text())
    dataset = json.loads((demo_nnunet_dir / "dataset.json").read_text())
    pm = PlansManager(plans)
    cm = pm.get_configuration("3d_fullres")
    img = sitk.ReadImage(str(shared_data / "ts_example_ct_sm.nii.gz"))
    arr = sitk.GetArrayFromImage(img)
    spacing = tuple(reversed(img.GetSpacing()))
    ref, _, props = DefaultPreprocessor(verbose=False).run_case_npy(arr[None].astype(np.float32), None,
                                                                     {"spacing": list(spacing)}, pm, cm, dataset)
    p = plans["foreground_intensity_properties_per_channel"]["0"]
    crop = nonzero_crop(arr)
    assert [list(b) for b in crop.bbox] == [list(b) for b in props["bbox_used_for_cropping"]]
    data = ct_normalize(arr[crop.slices], CTNormalization(p["mean"], p["std"], p["percentile_00_5"],
                                                           p["percentile_99_5"]))[None]
    new_shape = compute_new_shape(crop.shape_after, spacing, cm.spacing)
    out = resample(data, make_plan(crop.shape_after, new_shape, spacing, cm.spacing, ResamplingRule(), False))
    assert out.shape == ref.shape
    assert np.array_equal(out, ref)

