"""flare_rt.statistics: closed-form phantoms, the writers, and SimpleITK's label statistics on real CTs."""
from __future__ import annotations

import csv
import json
import logging

import numpy as np
import pytest
import SimpleITK as sitk

from flare_rt import statistics as st
from flare_rt.errors import ConfigError
from flare_rt.io import load_volume
from flare_rt.labels import STRUCTURE_NAMES
from flare_rt.statistics import (
    default_statistics_path,
    label_counts,
    read_statistics_json,
    statistics_report,
    structure_statistics,
    write_statistics_csv,
    write_statistics_json,
)

SPACING = (2.5, 0.8, 1.1)  # z, y, x: anisotropic; voxel = 2.2 mm^3
VOXEL_ML = 2.5 * 0.8 * 1.1 / 1000


@pytest.fixture()
def phantom():
    """Boxes of exact voxel counts: liver 4x5x6 = 120 voxels at 50 HU, spleen 3x3x3 = 27 voxels holding
    the values -13..13 once each (mean = median = 0), pancreas 2x2x2 = 8 voxels holding {1, 2, 3, 10}
    twice (mean 4, median 2.5: numpy's mean of the two middle values), aorta 7x8x9 = 504 random values."""
    rng = np.random.default_rng(7)
    image = rng.integers(-1000, 1000, size=(12, 20, 24)).astype(np.int16)
    labels = np.zeros(image.shape, np.uint8)
    labels[1:5, 2:7, 3:9] = 1
    image[1:5, 2:7, 3:9] = 50
    labels[6:9, 10:13, 0:3] = 3
    image[6:9, 10:13, 0:3] = rng.permutation(np.arange(-13, 14)).reshape(3, 3, 3)
    labels[10:12, 0:2, 20:22] = 4
    image[10:12, 0:2, 20:22] = rng.permutation([1, 2, 3, 10, 1, 2, 3, 10]).reshape(2, 2, 2)
    labels[3:10, 12:20, 12:21] = 5
    return labels, image


def test_phantom_closed_form(phantom):
    labels, image = phantom
    stats = structure_statistics(labels, image, SPACING, STRUCTURE_NAMES)
    assert list(stats) == [STRUCTURE_NAMES[k] for k in range(1, 15)]
    liver, spleen, pancreas, aorta = stats["liver"], stats["spleen"], stats["pancreas"], stats["aorta"]
    assert (liver["id"], liver["voxels"], liver["mean_hu"], liver["median_hu"]) == (1, 120, 50.0, 50.0)
    assert liver["volume_ml"] == pytest.approx(120 * VOXEL_ML, rel=1e-12)
    assert (spleen["voxels"], spleen["mean_hu"], spleen["median_hu"]) == (27, 0.0, 0.0)
    assert spleen["volume_ml"] == pytest.approx(27 * VOXEL_ML, rel=1e-12)
    assert (pancreas["voxels"], pancreas["mean_hu"], pancreas["median_hu"]) == (8, 4.0, 2.5)
    values = image[3:10, 12:20, 12:21].astype(np.float64)
    assert aorta["voxels"] == 504
    assert aorta["volume_ml"] == pytest.approx(504 * VOXEL_ML, rel=1e-12)
    assert aorta["mean_hu"] == pytest.approx(values.mean(), rel=1e-12)
    assert aorta["median_hu"] == np.median(values)
    for name in ("right_kidney", "ivc", "tumor"):  # absent: volume 0, no HU
        assert stats[name] == {"id": stats[name]["id"], "voxels": 0, "volume_ml": 0.0, "mean_hu": None,
                               "median_hu": None}


def test_float_image_and_odd_median():
    labels = np.zeros((3, 4, 5), np.uint8)
    labels[0, 0, :3] = 14
    image = np.full(labels.shape, -1000.0, np.float32)
    image[0, 0, :3] = [-0.5, 7.25, 100.0]
    s = structure_statistics(labels, image, (1.0, 1.0, 1.0), {14: "tumor"})["tumor"]
    assert s["median_hu"] == 7.25 and s["mean_hu"] == pytest.approx((-0.5 + 7.25 + 100.0) / 3, rel=1e-7)
    assert s["volume_ml"] == pytest.approx(0.003)


def test_slabs_give_the_same_result(phantom, monkeypatch):
    labels, image = phantom
    whole = structure_statistics(labels, image, SPACING)
    monkeypatch.setattr(st, "SLAB_VOXELS", 7 * 20 * 24 // 3)  # slabs of 2 z-slices: 6 slabs, ragged end
    assert list(st._slabs(labels.shape)) == [slice(z, min(z + 2, 12)) for z in range(0, 12, 2)]
    assert structure_statistics(labels, image, SPACING) == whole
    np.testing.assert_array_equal(label_counts(labels), np.bincount(labels.ravel()))


def test_unnamed_ids_and_background_are_left_out(phantom, caplog):
    labels, image = phantom
    labels = labels.copy()
    labels[0, 0, 0] = 20
    with caplog.at_level(logging.WARNING, logger="flare_rt.statistics"):
        stats = structure_statistics(labels, image, SPACING, {0: "background", 1: "liver", 2: "right_kidney"})
    assert list(stats) == ["liver", "right_kidney"]
    assert "[3, 4, 5, 20]" in caplog.text


@pytest.mark.parametrize("case", ["shape", "empty", "negative", "float_labels", "spacing", "zero_spacing"])
def test_bad_input_is_a_config_error(phantom, case):
    labels, image = phantom
    spacing = SPACING
    if case == "shape":
        image = image[:-1]
    elif case == "empty":
        labels, image = labels[:0], image[:0]
    elif case == "negative":
        labels = labels.astype(np.int16) - 1
    elif case == "float_labels":
        labels = labels.astype(np.float32)
    elif case == "spacing":
        spacing = (1.0, 1.0)
    else:
        spacing = (1.0, 0.0, 1.0)
    with pytest.raises(ConfigError):
        structure_statistics(labels, image, spacing)


def test_json_and_csv_writers(phantom, tmp_path):
    labels, image = phantom
    stats = structure_statistics(labels, image, SPACING)
    report = statistics_report(stats, "case_a", SPACING, model="demo.onnx")
    out = default_statistics_path(tmp_path / "case_a.nii.gz")
    assert out == tmp_path / "case_a_statistics.json"
    assert write_statistics_json(report, out) == out
    loaded = read_statistics_json(out)
    assert loaded == json.loads(json.dumps(report))
    assert loaded["case"] == "case_a" and loaded["model"] == "demo.onnx"
    assert loaded["spacing_mm"] == {"x": 1.1, "y": 0.8, "z": 2.5}
    assert loaded["structures"]["pancreas"] == {"id": 4, "voxels": 8, "volume_ml": round(8 * VOXEL_ML, 4),
                                                "mean_hu": 4.0, "median_hu": 2.5}
    assert loaded["structures"]["tumor"]["mean_hu"] is None

    other = statistics_report(structure_statistics(np.zeros_like(labels), image, SPACING), "case_b", SPACING)
    path = write_statistics_csv([report, other], tmp_path / "statistics.csv")
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0][:5] == ["case", "liver_volume_ml", "liver_mean_hu", "right_kidney_volume_ml",
                           "right_kidney_mean_hu"]
    assert len(rows[0]) == 1 + 2 * 14 and rows[0][-2:] == ["tumor_volume_ml", "tumor_mean_hu"]
    a, b = dict(zip(rows[0], rows[1])), dict(zip(rows[0], rows[2]))
    assert (a["case"], float(a["liver_volume_ml"]), float(a["liver_mean_hu"])) == ("case_a", round(120 * VOXEL_ML, 4), 50.0)
    assert (a["right_kidney_volume_ml"], a["right_kidney_mean_hu"]) == ("0.0", "")
    assert (b["case"], b["liver_volume_ml"], b["liver_mean_hu"]) == ("case_b", "0.0", "")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case_a_statistics.json", "statistics.csv"]  # no temp


def test_read_rejects_foreign_json(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('{"a": 1}')
    with pytest.raises(ConfigError, match="x.json"):
        read_statistics_json(path)


# --- real CTs against SimpleITK's LabelIntensityStatisticsImageFilter ----------------------------------------

def _dicom_labels(shared_data):
    """The DICOM patient and its labels brought onto the DICOM grid by physical-space nearest-neighbour
    resampling; the labels are stored flipped in y (LAS vs LPS), so this must equal the flip."""
    volume = load_volume(shared_data / "ts_dicom")
    stored = sitk.ReadImage(str(shared_data / "ts_dicom_seg_flare.nii.gz"))
    g = volume.geometry
    on_grid = sitk.Resample(stored, g.size, sitk.Transform(), sitk.sitkNearestNeighbor, g.origin, g.spacing,
                            g.direction, 0, stored.GetPixelID())
    labels = sitk.GetArrayFromImage(on_grid)
    np.testing.assert_array_equal(labels, sitk.GetArrayFromImage(stored)[:, ::-1, :])
    assert 0 < np.count_nonzero(labels) < labels.size
    return volume, labels, on_grid


def _sm_labels(shared_data):
    volume = load_volume(shared_data / "ts_example_ct_sm.nii.gz")
    img = sitk.ReadImage(str(shared_data / "ts_example_ct_sm_seg_flare.nii.gz"))
    assert img.GetSize() == tuple(reversed(volume.array.shape))
    return volume, sitk.GetArrayFromImage(img), img


@pytest.mark.parametrize("case", ["ts_dicom", "ts_example_ct_sm"])
def test_matches_simpleitk(shared_data, case):
    volume, labels, label_img = (_dicom_labels if case == "ts_dicom" else _sm_labels)(shared_data)
    assert volume.array.dtype == np.int16  # ITK's integer-centred bins below need an 8/16-bit image
    stats = structure_statistics(labels, volume.array, volume.spacing)
    image = sitk.GetImageFromArray(volume.array)
    image.CopyInformation(label_img)
    exact = sitk.LabelIntensityStatisticsImageFilter()
    exact.SetNumberOfBins(1 << 16)  # one bin per int16 value, centred on it: ITK's median is then exact
    exact.Execute(label_img, image)
    binned = sitk.LabelIntensityStatisticsImageFilter()  # default: 128 bins over the image's [min, max]
    binned.Execute(label_img, image)
    half_bin = (float(volume.array.max()) - float(volume.array.min())) / binned.GetNumberOfBins() / 2

    present = [s for s in stats.values() if s["voxels"]]
    assert {s["id"] for s in present} == set(exact.GetLabels())
    assert len(present) >= (7 if case == "ts_dicom" else 12)
    for name, s in stats.items():
        k = s["id"]
        if not exact.HasLabel(k):
            assert s == {"id": k, "voxels": 0, "volume_ml": 0.0, "mean_hu": None, "median_hu": None}, name
            continue
        assert s["voxels"] == exact.GetNumberOfPixels(k), name
        assert s["volume_ml"] * 1000 == pytest.approx(exact.GetPhysicalSize(k), rel=1e-12), name
        assert s["mean_hu"] == pytest.approx(exact.GetMean(k), rel=1e-12, abs=1e-9), name
        assert s["median_hu"] == exact.GetMedian(k), name
        # the default histogram returns a bin centre (or the mean of two): within half a bin
        assert abs(s["median_hu"] - binned.GetMedian(k)) <= half_bin + 1e-9, name
    # the default binning does differ somewhere: the half-bin tolerance is what it takes, not slack
    assert max(abs(s["median_hu"] - binned.GetMedian(s["id"])) for s in present) > 1.0
