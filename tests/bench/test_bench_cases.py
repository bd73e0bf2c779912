"""The benchmark's CT builds without SimpleITK (nibabel + numpy), checked against SimpleITK itself."""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

import cases
from measure import read_labels, read_zyx

# the reference implementation; a core dependency everywhere but on the GPU check machine (no 53 MB wheel there)
sitk = pytest.importorskip("SimpleITK", reason="SimpleITK is not installed (the GPU check machine)")


def sitk_reference(src, size, spacing):
    """The definition of the timing case (../shared/data/README.md): SimpleITK B-spline resampling onto a
    grid of ``size`` voxels of ``spacing`` centred on the scan, default pixel -1024, int16."""
    img = sitk.ReadImage(str(src))
    direction = np.array(img.GetDirection()).reshape(3, 3)
    centre = img.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in img.GetSize()])
    origin = np.array(centre) - direction @ (np.array(spacing) * (np.array(size) - 1) / 2)
    return sitk.Resample(img, list(size), sitk.Transform(), sitk.sitkBSpline, origin.tolist(), list(spacing),
                         img.GetDirection(), -1024, sitk.sitkInt16)


@pytest.mark.parametrize("size,spacing", [((160, 140, 90), (2.5, 2.5, 3.9)),  # larger than the scan: padding
                                          ((96, 80, 61), (3.7, 3.3, 5.1))])
def test_nibabel_build_equals_simpleitk(tmp_path, example_ct_path, size, spacing):
    dst = cases.build_ts269(example_ct_path, tmp_path / "ct.nii.gz", size, spacing)
    ref = sitk_reference(example_ct_path, size, spacing)
    got = sitk.ReadImage(str(dst))
    # same geometry as SimpleITK reads it
    assert got.GetSize() == ref.GetSize()
    np.testing.assert_allclose(got.GetSpacing(), ref.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(got.GetOrigin(), ref.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(got.GetDirection(), ref.GetDirection(), atol=1e-6)
    assert got.GetPixelID() == sitk.sitkInt16
    a, b = sitk.GetArrayFromImage(got).astype(np.int32), sitk.GetArrayFromImage(ref).astype(np.int32)
    # identical voxels (tolerance 0: truncation and the outside-the-scan rule match ITK exactly); the
    # grid reaches outside the scan, so both sides of the boundary rule are exercised
    assert (a == -1024).any() and (a > 0).any()
    assert np.array_equal(a, b), f"{np.count_nonzero(a != b)} voxels differ, max |Δ| {np.abs(a - b).max()}"


def test_bspline_matrix_reproduces_scipy_spline_interpolation():
    import scipy.ndimage as ndi

    rng = np.random.default_rng(0)
    data = rng.normal(size=13)
    coef = ndi.spline_filter1d(data, order=3, mode="mirror")
    coords = np.linspace(-0.5, 12.5, 41)
    w, inside = cases.bspline_matrix(coords, 13)
    want = ndi.map_coordinates(data, coords[None], order=3, mode="mirror")
    np.testing.assert_allclose(w @ coef, want, atol=1e-12)
    assert inside.all() and not cases.bspline_matrix([-0.51, 12.51], 13)[1].any()
    np.testing.assert_allclose(w.sum(1), 1.0)  # partition of unity


def test_resampling_refuses_rotated_grids():
    a = np.eye(4)
    b = np.eye(4)
    b[:2, :2] = [[0, -1], [1, 0]]
    with pytest.raises(ValueError, match="keep the input's axes"):
        cases.resample_bspline_axis_aligned(np.zeros((4, 4, 4)), a, b, (4, 4, 4), -1024)


def test_small_crop_equals_the_shared_file(tmp_path, example_ct_path, shared_data):
    dst = cases.build_small(example_ct_path, tmp_path / "sm.nii.gz")
    ref = nib.load(str(shared_data / "ts_example_ct_sm.nii.gz"))
    got = nib.load(str(dst))
    np.testing.assert_array_equal(np.asarray(got.dataobj), np.asarray(ref.dataobj))
    assert got.get_data_dtype() == ref.get_data_dtype()
    np.testing.assert_allclose(got.affine, ref.affine, atol=1e-6)
    assert read_zyx(dst)[1] == (3.0, 3.0, 3.0)


def test_readers_match_simpleitk(example_ct_path, shared_data):
    arr, spacing = read_zyx(example_ct_path)
    img = sitk.ReadImage(str(example_ct_path))
    np.testing.assert_array_equal(arr, sitk.GetArrayFromImage(img))
    assert spacing == pytest.approx(img.GetSpacing()[::-1])
    seg = shared_data / "ts_example_ct_sm_seg_flare.nii.gz"
    np.testing.assert_array_equal(read_labels(seg), sitk.GetArrayFromImage(sitk.ReadImage(str(seg))))


def test_image_info_from_the_header(example_ct_path):
    info = cases.image_info(example_ct_path)
    assert info["size_xyz"] == [122, 101, 112] and info["spacing_xyz"] == [3.0, 3.0, 3.0]
    assert info["pixel_type"] == "int32"
