"""flare_rt.preview: size, orientation independence, radiological display, centroid, legend, real CTs."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from flare_rt import preview as pv
from flare_rt.errors import ConfigError
from flare_rt.io import load_volume
from flare_rt.labels import COLORS, NAMES, STRUCTURE_NAMES
from flare_rt.preview import (
    LegendEntry,
    default_preview_path,
    label_centroid,
    layout,
    legend_entries,
    preview_slices,
    render_preview,
)

SPACING_XYZ = (0.9, 1.3, 2.5)  # distinct per axis: a wrong permutation of the spacing changes the image


def lps_phantom():
    """(z, y, x) arrays in LPS (identity direction): x toward the patient's left, y posterior, z superior.
    A 'liver' on the patient's right (low x), anterior (low y) and superior (high z) of a 'spleen'."""
    rng = np.random.default_rng(3)
    image = rng.normal(40, 60, size=(30, 40, 50)).astype(np.int16)
    labels = np.zeros(image.shape, np.uint8)
    labels[18:26, 5:15, 4:16] = 1  # liver: right, anterior, superior
    labels[4:10, 25:35, 34:46] = 3  # spleen: left, posterior, inferior
    return image, labels


def as_image(array, direction=(1, 0, 0, 0, 1, 0, 0, 0, 1), spacing=SPACING_XYZ):
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(spacing)
    img.SetDirection(direction)
    img.SetOrigin((-12.0, 30.0, 7.0))
    return img


def stored_as(image, labels, code):
    """The same physical volume stored in another axis order (as SimpleITK's DICOMOrient stores it, e.g. a
    NIfTI in LAS/RAS/ASL): arrays, (z, y, x) spacing and direction, all consistent."""
    img, lab = sitk.DICOMOrient(as_image(image), code), sitk.DICOMOrient(as_image(labels), code)
    assert img.GetDirection() == lab.GetDirection()
    return (sitk.GetArrayFromImage(img), sitk.GetArrayFromImage(lab), tuple(reversed(img.GetSpacing())),
            img.GetDirection())


def png(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_png_size_and_atomic_write(tmp_path):
    image, labels = lps_phantom()
    path = render_preview(image, labels, tuple(reversed(SPACING_XYZ)), (1, 0, 0, 0, 1, 0, 0, 0, 1),
                          tmp_path / "case_preview.png", title="phantom")
    slices = preview_slices(image, labels, tuple(reversed(SPACING_XYZ)), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    expected_h = layout(slices.panels, legend_rows=1).height
    assert png(path).shape == (expected_h, pv.WIDTH_PX, 3)
    assert 200 < expected_h < 900
    assert [p.name for p in tmp_path.iterdir()] == ["case_preview.png"]  # no temporary left
    assert default_preview_path(tmp_path / "case.nii.gz") == tmp_path / "case_preview.png"


def test_panels_share_one_scale_with_the_voxel_aspect():
    image, labels = lps_phantom()
    slices = preview_slices(image, labels, tuple(reversed(SPACING_XYZ)), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    lay = layout(slices.panels, legend_rows=1)
    sx, sy, sz = SPACING_XYZ
    mm = [(50 * sx, 40 * sy), (50 * sx, 30 * sz), (40 * sy, 30 * sz)]  # axial, coronal, sagittal (w, h)
    scales = [(box[2] / w, box[3] / h) for box, (w, h) in zip(lay.boxes, mm)]
    for sw, sh in scales:
        assert sw == pytest.approx(scales[0][0], rel=1e-9) and sh == pytest.approx(scales[0][0], rel=1e-9)
    assert lay.boxes[-1][0] + lay.boxes[-1][2] <= pv.WIDTH_PX - pv.MARGIN_PX + 1e-6


@pytest.mark.parametrize("code", ["LAS", "RAS", "RPI", "ASL", "SRA", "ILP"])
def test_other_axis_orders_give_the_same_pixels(tmp_path, code):
    image, labels = lps_phantom()
    ref = render_preview(image, labels, tuple(reversed(SPACING_XYZ)), (1, 0, 0, 0, 1, 0, 0, 0, 1),
                         tmp_path / "lps.png", title="t")
    img2, lab2, spacing2, direction2 = stored_as(image, labels, code)
    assert img2.shape != image.shape or not np.array_equal(img2, image)  # really stored differently
    other = render_preview(img2, lab2, spacing2, direction2, tmp_path / f"{code}.png", title="t")
    np.testing.assert_array_equal(png(other), png(ref))


def test_slices_through_the_centroid():
    image, labels = lps_phantom()
    slices = preview_slices(image, labels, (2.5, 1.3, 0.9), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    # liver 8x10x12 = 960 voxels centred (21.5, 9.5, 9.5), spleen 6x10x12 = 720 centred (6.5, 29.5, 39.5):
    # centroid (15.07, 18.07, 22.36)
    assert slices.center == (15, 18, 22)
    cz, cy, cx = slices.center
    axial, coronal, sagittal = slices.panels
    np.testing.assert_array_equal(axial.ct, image[cz])
    np.testing.assert_array_equal(coronal.labels, labels[::-1, cy, :])
    np.testing.assert_array_equal(sagittal.ct, image[::-1, :, cx])
    assert (axial.pixel_mm, coronal.pixel_mm, sagittal.pixel_mm) == ((1.3, 0.9), (2.5, 0.9), (2.5, 1.3))


@pytest.mark.parametrize("code", ["LPS", "RAS", "SLA", "IRP"])
def test_radiological_convention(code):
    """Liver alone (patient's right, anterior, superior) and spleen alone (left, posterior, inferior):
    where each lands in the three panels, whatever the stored axis order."""
    image, labels = lps_phantom()

    def where(label):  # (row, col) of the label's mean position in each panel, as fractions of its size
        only = np.where(labels == label, labels, 0).astype(np.uint8)
        img2, lab2, spacing2, direction2 = stored_as(image, only, code)
        out = []
        for panel in preview_slices(img2, lab2, spacing2, direction2).panels:
            rows, cols = np.nonzero(panel.labels)
            out.append((rows.mean() / panel.labels.shape[0], cols.mean() / panel.labels.shape[1]))
        return out

    (ax_r, ax_c), (co_r, co_c), (sa_r, sa_c) = where(1)  # liver
    assert ax_c < 0.5 and ax_r < 0.5  # axial: patient's right on the image's left, anterior up
    assert co_c < 0.5 and co_r < 0.5  # coronal: right on the left, superior up
    assert sa_c < 0.5 and sa_r < 0.5  # sagittal: anterior on the left, superior up
    (ax_r, ax_c), (co_r, co_c), (sa_r, sa_c) = where(3)  # spleen
    assert ax_c > 0.5 and ax_r > 0.5
    assert co_c > 0.5 and co_r > 0.5
    assert sa_c > 0.5 and sa_r > 0.5


def test_centroid_in_another_storage_order_is_the_same_anatomical_point():
    image, labels = lps_phantom()
    ref = preview_slices(image, labels, (2.5, 1.3, 0.9), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    img2, lab2, spacing2, direction2 = stored_as(image, labels, "ASL")
    other = preview_slices(img2, lab2, spacing2, direction2)
    assert other.center == ref.center
    for a, b in zip(ref.panels, other.panels):
        np.testing.assert_array_equal(a.ct, b.ct)
        np.testing.assert_array_equal(a.labels, b.labels)
        assert a.pixel_mm == b.pixel_mm


def test_centroid_of_a_box_and_of_nothing():
    labels = np.zeros((9, 10, 11), np.uint8)
    assert label_centroid(labels) == (4, 5, 5)
    labels[2:5, 6:10, 0:3] = 2  # centre (3, 7.5, 1): 7.5 rounds half up
    assert label_centroid(labels) == (3, 8, 1)
    labels[8, 0, 10] = 14  # one voxel far away pulls the centroid a little
    c = np.argwhere(labels > 0).mean(axis=0)
    assert label_centroid(labels) == tuple(int(np.floor(v + 0.5)) for v in c)


def test_legend_lists_exactly_the_present_classes():
    labels = np.zeros((4, 5, 6), np.uint8)
    labels[0, 0, 0], labels[1, 2, 3], labels[3, 4, 5] = 13, 1, 20
    entries = legend_entries(labels, STRUCTURE_NAMES)
    assert [e.id for e in entries] == [1, 13, 20]
    assert entries[0] == LegendEntry(1, "liver", COLORS[1])
    assert entries[1] == LegendEntry(13, "left_kidney", COLORS[13])
    assert entries[2].name == "label 20" and entries[2].color not in COLORS.values()
    assert legend_entries(np.zeros_like(labels)) == []
    # the palette: one fixed, distinct colour per FLARE class
    assert set(COLORS) == set(NAMES) and len(set(COLORS.values())) == len(COLORS)


def test_empty_labels_and_a_two_slice_image(tmp_path):
    image, _ = lps_phantom()
    thin = image[10:12]
    path = render_preview(thin, np.zeros(thin.shape, np.uint8), (2.5, 1.3, 0.9), (1, 0, 0, 0, 1, 0, 0, 0, 1),
                          tmp_path / "empty.png")
    slices = preview_slices(thin, np.zeros(thin.shape, np.uint8), (2.5, 1.3, 0.9), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    assert slices.center == (1, 20, 25)  # the volume's centre
    assert png(path).shape == (layout(slices.panels, 0).height, pv.WIDTH_PX, 3)
    assert slices.panels[1].ct.shape == (2, 50) and slices.panels[2].ct.shape == (2, 40)


def test_quantised_when_over_the_size_budget(tmp_path, monkeypatch):
    image, labels = lps_phantom()
    args = (image, labels, (2.5, 1.3, 0.9), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    rgb = render_preview(*args, tmp_path / "rgb.png", title="t")
    monkeypatch.setattr(pv, "MAX_PNG_BYTES", 1000)
    small = render_preview(*args, tmp_path / "small.png", title="t")
    with Image.open(rgb) as a, Image.open(small) as b:
        assert (a.mode, b.mode) == ("RGB", "P")
    assert small.stat().st_size < rgb.stat().st_size
    diff = np.abs(png(small).astype(int) - png(rgb).astype(int))
    assert diff.max() <= 40 and diff.mean() < 3


@pytest.mark.parametrize("bad", ["suffix", "shape", "spacing", "direction"])
def test_bad_arguments(tmp_path, bad):
    image, labels = lps_phantom()
    spacing, direction, path = (2.5, 1.3, 0.9), (1, 0, 0, 0, 1, 0, 0, 0, 1), tmp_path / "p.png"
    if bad == "suffix":
        path = tmp_path / "p.jpg"
    elif bad == "shape":
        labels = labels[:, :-1]
    elif bad == "spacing":
        spacing = (2.5, -1.0, 0.9)
    else:
        direction = (1, 0, 0, 1)
    with pytest.raises(ConfigError):
        render_preview(image, labels, spacing, direction, path)
    assert not any(tmp_path.iterdir())


def test_real_dicom_patient_in_both_stored_orders(shared_data, tmp_path):
    """The DICOM series (LPS) with its labels resampled onto it, and the same CT flipped into the labels'
    own stored order (LAS, the NIfTI's direction): the same preview, under the size budget."""
    volume = load_volume(shared_data / "ts_dicom")
    stored = sitk.ReadImage(str(shared_data / "ts_dicom_seg_flare.nii.gz"))
    labels_las = sitk.GetArrayFromImage(stored)
    labels_lps = labels_las[:, ::-1, :]
    a = render_preview(volume.array, labels_lps, volume.spacing, volume.direction, tmp_path / "lps.png", title="t")
    b = render_preview(volume.array[:, ::-1, :], labels_las, tuple(reversed(stored.GetSpacing())),
                       stored.GetDirection(), tmp_path / "las.png", title="t")
    np.testing.assert_array_equal(png(a), png(b))
    assert png(a).shape[1] == pv.WIDTH_PX and a.stat().st_size < 300_000
    entries = legend_entries(labels_lps)
    assert [e.name for e in entries] == ["liver", "spleen", "pancreas", "aorta", "ivc", "right_adrenal", "stomach"]
    # radiological: in the axial panel the liver lies on the image's left, the spleen on its right
    axial = preview_slices(volume.array, labels_lps, volume.spacing, volume.direction).panels[0]
    cols = {k: np.nonzero(axial.labels == k)[1].mean() / axial.labels.shape[1] for k in (1, 3)}
    assert cols[1] < 0.5 < cols[3]
