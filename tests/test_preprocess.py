"""Preprocessing helpers that need nothing but numpy: crop boxes, the body ROI, label upsampling, and the
one linear-interpolation rule shared by resampling and fast mode's label refinement."""
from __future__ import annotations

import itertools

import numpy as np
from scipy import ndimage

from flare_rt.preprocess import body_crop, nonzero_crop, paste
from flare_rt.resample import linear_plane, linear_weights, resize_skimage, upsample_labels_nearest


def test_empty_image_crop_is_whole_volume():
    crop = nonzero_crop(np.zeros((4, 5, 6)))
    assert crop.bbox == ((0, 4), (0, 5), (0, 6))


def test_body_crop_stays_inside_and_contains_body():
    img = np.full((20, 50, 60), -1024, dtype=np.int16)
    img[5:15, 10:40, 20:50] = 40
    crop = body_crop(img, -500, margin=2)
    assert crop.bbox == ((3, 17), (8, 42), (18, 52))
    assert body_crop(np.full((4, 4, 4), -1000.0)).bbox == ((0, 4), (0, 4), (0, 4))


def test_nearest_label_upsampling_is_centre_aligned():
    lab = np.arange(6, dtype=np.uint8).reshape(1, 2, 3)
    up = upsample_labels_nearest(lab, (2, 4, 6))
    assert up.shape == (2, 4, 6)
    assert np.array_equal(up[0], np.repeat(np.repeat(lab[0], 2, 0), 2, 1))
    assert np.array_equal(upsample_labels_nearest(up, (1, 2, 3)), lab)



def test_crop_and_paste_round_trip():
    img = np.zeros((12, 30, 40), dtype=np.float32)
    img[2:9, 5:25, 7:31] = np.random.default_rng(3).standard_normal((7, 20, 24))
    crop = nonzero_crop(img)
    assert crop.bbox == ((2, 9), (5, 25), (7, 31)) and crop.shape_after == (7, 20, 24)
    assert np.array_equal(paste(img[crop.slices], crop), img)


def test_linear_weights_are_ndimage_zoom_order_1():
    """The shared weights reproduce ``ndimage.zoom(order=1, grid_mode=True, mode='nearest')`` along an axis."""
    rng = np.random.default_rng(4)
    for n_in, n_out in ((7, 19), (19, 7), (5, 5), (2, 9)):
        x = rng.standard_normal(n_in)
        lo, hi, w = linear_weights(n_in, n_out)
        ours = (1 - w) * x[lo] + w * x[hi]
        ref = ndimage.zoom(x, n_out / n_in, order=1, mode="nearest", grid_mode=True)
        np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-12)
        assert linear_weights(n_in, n_out, np.float32)[2].dtype == np.float32


def test_separable_plane_interpolation_is_scipys_zoom():
    """``linear_plane`` (faithful mode's per-class in-plane resize) against ``ndimage.zoom(order=1)``: float64
    to its rounding, float32 to at most one unit in the last place (and bitwise on a real way back's
    333x333 -> 512x512 plane); ``resize_skimage`` takes it for order-1 float32 planes and still clips."""
    rng = np.random.default_rng(1)
    shapes = [(1, 7), (5, 5), (120, 77), (64, 200), (333, 333)]
    for (h, w), (H, W), dtype in itertools.product(shapes, [(1, 3), (7, 9), (60, 38), (512, 512)],
                                                   (np.float32, np.float64)):
        x = (rng.standard_normal((h, w)) * 10).astype(dtype)
        ref = ndimage.zoom(x, (H / h, W / w), order=1, mode="nearest", grid_mode=True)
        got = linear_plane(x, (H, W))
        assert got.shape == ref.shape and got.dtype == ref.dtype
        if dtype == np.float64:
            np.testing.assert_allclose(got, ref, rtol=1e-14, atol=1e-13)
        else:
            assert np.all(np.abs(got - ref) <= np.spacing(np.abs(ref))), (h, w, H, W)
            if (h, w, H, W) == (333, 333, 512, 512):
                assert np.array_equal(got, ref)
    x = rng.standard_normal((40, 30)).astype(np.float32)
    out = resize_skimage(x, (90, 70), 1, np.float32)
    assert x.min() <= out.min() and out.max() <= x.max()
    assert np.all(np.abs(out - ndimage.zoom(x, (90 / 40, 70 / 30), order=1, mode="nearest", grid_mode=True))
                  <= np.spacing(np.float32(10)))
