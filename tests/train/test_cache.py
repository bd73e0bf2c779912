"""Preprocessing cache: the runtime's preprocessing, nnU-Net-like label resampling, foreground index,
resumable and parallel builds; the fingerprint."""
from __future__ import annotations

import json

import numpy as np
import pytest

from flare_rt.bundle import CTNormalization, ResamplingRule
from flare_rt.preprocess import compute_new_shape, ct_normalize, nonzero_crop
from flare_rt.resample import make_plan, resample
from flare_rt.train.cache import (CacheSpec, build_cache, class_locations, open_case, preprocess_arrays,
                                  resample_labels)
from flare_rt.train.dataset import build_index
from flare_rt.train.fingerprint import compute_fingerprint
from synthetic import flare_dataset, synthetic_case

NORM = CTNormalization(mean=80.0, std=60.0, lower=-50.0, upper=260.0)


def blocky_labels(shape, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    lab = np.zeros(shape, np.uint8)
    for k in (1, 2, 3, 5, 14):
        lo = [int(rng.integers(0, s - 4)) for s in shape]
        hi = [min(s, a + int(rng.integers(3, max(4, s // 2)))) for s, a in zip(shape, lo)]
        lab[tuple(slice(a, b) for a, b in zip(lo, hi))] = k
    return lab


@pytest.mark.parametrize("shape,spacing,target", [((20, 60, 50), (3.0, 0.8, 0.8), (4.0, 1.2, 1.2)),
                                                  ((11, 40, 36), (5.0, 0.7, 0.7), (4.0, 1.2, 1.2)),
                                                  ((20, 31, 33), (1.0, 1.0, 1.0), (1.2, 1.3, 0.9))])
def test_label_resampling_agrees_with_nnunet(shape, spacing, target):
    nn = pytest.importorskip("nnunetv2.preprocessing.resampling.default_resampling")
    labels = blocky_labels(shape)
    new_shape = compute_new_shape(shape, spacing, target)
    plan = make_plan(shape, new_shape, spacing, target, ResamplingRule(), probabilities=True)
    ours = resample_labels(labels, plan)
    ref = nn.resample_data_or_seg_to_shape(labels[None], new_shape, spacing, target, True, 1, 0, None)[0]
    assert ours.shape == ref.shape and ours.dtype == np.uint8
    assert (ours == ref).mean() > 0.99  # they differ only where two labels tie near a boundary
    assert set(np.unique(ours)) == set(np.unique(ref))


def test_preprocessing_is_the_runtime_preprocessing():
    image, labels = synthetic_case(0, (20, 72, 72))
    image = np.pad(image, ((0, 0), (3, 0), (0, 5)))  # zero border: cropped away
    labels = np.pad(labels, ((0, 0), (3, 0), (0, 5)))
    spacing, spec = (3.0, 2.0, 2.0), CacheSpec((4.0, 2.4, 2.4), NORM)
    case = preprocess_arrays(image, spacing, labels, spec)
    crop = nonzero_crop(image)
    assert crop.bbox[1][0] == 3
    shape = compute_new_shape(crop.shape_after, spacing, spec.spacing)
    plan = make_plan(crop.shape_after, shape, spacing, spec.spacing, ResamplingRule(), probabilities=False)
    expected = resample(ct_normalize(image[crop.slices], NORM)[None], plan, np.float32, np.float32)[0]
    assert np.array_equal(case.image, expected)
    assert case.labels.shape == case.image.shape and case.labels.dtype == np.uint8
    assert set(case.locations) == {1, 2, 3, 5}
    for k, where in case.locations.items():
        assert (case.labels[tuple(where.T)] == k).all()


def test_reorientation_before_cropping():
    image, labels = synthetic_case(1, (10, 40, 36))
    lps = (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0)
    ras = (-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0)
    a = preprocess_arrays(image, (4.0, 2.4, 2.4), labels, CacheSpec((4.0, 2.4, 2.4), NORM, orientation="LPS"), lps)
    b = preprocess_arrays(image[:, ::-1, ::-1], (4.0, 2.4, 2.4), labels[:, ::-1, ::-1],
                          CacheSpec((4.0, 2.4, 2.4), NORM, orientation="LPS"), ras)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.labels, b.labels)


def test_class_locations_sample_large_classes():
    labels = np.zeros((40, 100, 100), np.uint8)
    labels[:, :, :60] = 1  # 240,000 voxels: capped at 10,000 (> 1 % of the class)
    labels[0, 0, 99] = 7
    locs = class_locations(labels)
    assert len(locs[1]) == 10_000 and len(np.unique(locs[1], axis=0)) == 10_000
    assert locs[7].tolist() == [[0, 0, 99]]
    assert 0 not in locs


def test_cache_is_resumable_parallel_and_keyed(tmp_path):
    root = flare_dataset(tmp_path / "F", 3, shape=(10, 40, 40))
    index = build_index(root, progress=False)
    spec = CacheSpec((4.0, 3.0, 3.0), NORM)
    serial = build_cache(index.cases, spec, tmp_path / "serial", workers=1, progress=False)
    parallel = build_cache(index.cases, spec, tmp_path / "parallel", workers=2, progress=False)
    for c in index.cases:
        a, b = np.load(serial / f"{c.id}.npz"), np.load(parallel / f"{c.id}.npz")
        assert sorted(a.files) == sorted(b.files) and all(np.array_equal(a[k], b[k]) for k in a.files)
    stamps = {p.name: p.stat().st_mtime_ns for p in serial.glob("*.npz")}
    (serial / "case_01.npz").unlink()  # an interrupted build: one case missing
    build_cache(index.cases, spec, serial, workers=1, progress=False)
    after = {p.name: p.stat().st_mtime_ns for p in serial.glob("*.npz")}
    assert after["case_00.npz"] == stamps["case_00.npz"] and after["case_02.npz"] == stamps["case_02.npz"]
    assert (serial / "case_01.npz").is_file()
    build_cache(index.cases, CacheSpec((4.0, 2.0, 2.0), NORM), serial, workers=1, progress=False)  # new spacing
    assert (serial / "case_00.npz").stat().st_mtime_ns != stamps["case_00.npz"]
    meta = json.loads((serial / "case_00.json").read_text())
    case = open_case(serial, "case_00", index.case("case_00").annotated)
    assert list(case.shape) == meta["shape"] and isinstance(case.image, np.memmap)
    assert case.annotated == (0, 1, 2, 3, 5) and set(case.locations) == {1, 2, 3, 5}


def test_fingerprint_is_the_foreground_statistics(tmp_path):
    root = flare_dataset(tmp_path / "F", 2, shape=(10, 40, 40))
    index = build_index(root, progress=False)
    fp = compute_fingerprint(index.labelled(), progress=False)
    import SimpleITK as sitk

    values = []
    for c in index.labelled():
        img = sitk.GetArrayFromImage(sitk.ReadImage(c.image))
        lab = sitk.GetArrayFromImage(sitk.ReadImage(c.label))
        values.append(img[lab > 0].astype(np.float64))
    values = np.concatenate(values)
    assert fp.n_cases == 2 and fp.median_shape == (10, 40, 40)
    assert fp.median_spacing == pytest.approx((4.0, 2.4, 2.4))
    assert fp.mean == pytest.approx(values.mean(), abs=3.0)  # 10,000 samples per case
    assert fp.std == pytest.approx(values.std(), rel=0.05)
    assert fp.percentile_00_5 == pytest.approx(np.percentile(values, 0.5), abs=10)
    assert fp.percentile_99_5 == pytest.approx(np.percentile(values, 99.5), abs=10)
    norm = fp.normalization()
    assert (norm.mean, norm.lower, norm.upper) == (fp.mean, fp.percentile_00_5, fp.percentile_99_5)
