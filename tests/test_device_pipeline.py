"""The GPU pipeline is the CPU pipeline on another array module: every stage runs on a strict double of
CuPy (``strict_xp``) that refuses implicit host conversions and counts uploads, downloads and syncs. Each
function gives the numpy result exactly, and a whole ``Segmenter.predict`` uploads the CT once, downloads
the labels once, and syncs a number of times that does not grow with the number of tiles."""
from __future__ import annotations

import numpy as np
import pytest

from flare_rt.bundle import Bundle, ResamplingRule
from flare_rt.io import load_volume
from flare_rt.orientation import plan_reorientation
from flare_rt.pipeline import DEVICE_BLOCK_ROWS, FastOptions, SegmentOptions, Segmenter, compact_ct, paste_probabilities
from flare_rt.postprocess import labels_faithful, labels_refined
from flare_rt.preprocess import CropInfo, body_crop, ct_normalize, nonzero_crop, paste
from flare_rt.resample import make_plan, resample, upsample_labels_nearest
from flare_rt.resources import packaged_model
from flare_rt.window import WindowConfig, pad_to_patch, sliding_window_blocks
from flare_rt.xp import array_module
from strict_xp import COUNTERS, MODULE as dev, HostConversionError, StrictArray
from trivial_nets import CENTRES, BandNet

rng = np.random.default_rng(0)


def host(a):
    return a.get() if isinstance(a, StrictArray) else a


@pytest.fixture(autouse=True)
def _counters():
    COUNTERS.reset()
    yield


def test_the_double_is_strict():
    a = dev.asarray(np.arange(6.0))
    with pytest.raises(HostConversionError):
        np.asarray(a)
    with pytest.raises(HostConversionError):
        a + np.ones(6)
    with pytest.raises(HostConversionError):
        a[np.array([0, 1])]
    with pytest.raises(HostConversionError):
        np.sum(a)
    assert array_module(a) is dev
    assert bool(a.sum() > 0) and COUNTERS.syncs == 1
    assert COUNTERS.uploads == [48]


class DeviceBandNet:
    """BandNet with its constants on the device (uploaded once), as a GPU backend would hold its weights."""

    xp = dev

    def __init__(self):
        self.centres = dev.asarray(CENTRES[None, :, None, None, None])

    def __call__(self, batch):
        assert isinstance(batch, StrictArray)
        return -((batch - self.centres) ** 2)


# -- one function at a time --------------------------------------------------------------------------
def test_normalise_crop_and_paste():
    img = np.full((12, 40, 50), -1024, dtype=np.int16)
    img[2:10, 5:35, 8:44] = rng.integers(-900, 1500, (8, 30, 36))
    img[:, :3] = 0  # outside the non-zero box
    d = dev.asarray(img)
    crop = nonzero_crop(d)
    assert crop == nonzero_crop(img)
    assert body_crop(d, -500, 2, crop) == body_crop(img, -500, 2, crop)
    norm = Bundle.load(packaged_model()).meta.normalization
    np.testing.assert_array_equal(host(ct_normalize(d[crop.slices], norm)), ct_normalize(img[crop.slices], norm))
    np.testing.assert_array_equal(host(paste(d[crop.slices], crop)), paste(img[crop.slices], crop))


@pytest.mark.parametrize("shape, spacing, target, order_z", [
    ((20, 60, 50), (3.0, 0.8, 0.8), (4.0, 1.2, 1.2), 0),  # separate z, slices selected
    ((9, 30, 20), (5.0, 1.0, 1.0), (2.0, 1.0, 1.0), 1),  # separate z, linear along z
    ((20, 31, 33), (1.0, 1.0, 1.0), (1.2, 1.3, 0.9), 0),  # 3D resize
])
def test_resample_with_fused_normalisation(shape, spacing, target, order_z):
    norm = Bundle.load(packaged_model()).meta.normalization
    img = rng.integers(-1024, 1500, shape).astype(np.int16)
    from flare_rt.preprocess import compute_new_shape

    plan = make_plan(shape, compute_new_shape(shape, spacing, target), spacing, target,
                     ResamplingRule(data_order_z=order_z), False)
    ref = resample(ct_normalize(img, norm)[None], plan, np.float32, np.float64)  # normalise first, as nnU-Net
    pre = lambda a: ct_normalize(a, norm)  # noqa: E731
    np.testing.assert_array_equal(resample(img[None], plan, np.float32, np.float64, pre=pre), ref)
    np.testing.assert_array_equal(host(resample(dev.asarray(img)[None], plan, np.float32, np.float64, pre=pre)), ref)


def test_nearest_sampling_and_padding():
    lab = rng.integers(0, 15, (7, 20, 30)).astype(np.uint8)
    np.testing.assert_array_equal(host(upsample_labels_nearest(dev.asarray(lab), (9, 33, 41))),
                                  upsample_labels_nearest(lab, (9, 33, 41)))
    padded, unpad = pad_to_patch(dev.asarray(lab)[None], (8, 24, 24))
    ref, ref_unpad = pad_to_patch(lab[None], (8, 24, 24))
    np.testing.assert_array_equal(host(padded), ref)
    assert unpad == ref_unpad


def test_reorientation_views():
    a = rng.standard_normal((4, 5, 6)).astype(np.float32)
    reo = plan_reorientation((0, 1, 0, -1, 0, 0, 0, 0, 1), "LPS")
    assert not reo.identity
    np.testing.assert_array_equal(host(reo.apply(dev.asarray(a))), reo.apply(a))
    np.testing.assert_array_equal(host(reo.invert(reo.apply(dev.asarray(a)))), a)


@pytest.mark.parametrize("keep", [False, True])
def test_window_and_both_ways_back(keep):
    img = rng.standard_normal((1, 37, 70, 61)).astype(np.float32)
    cfg = WindowConfig((16, 32, 32), 0.5, batch_size=3)
    kept = (lambda o: (o[1] + o[2]) % 3 != 0) if keep else None
    ref_blocks = list(sliding_window_blocks(img, BandNet(), 15, cfg, keep_tile=kept))
    blocks = list(sliding_window_blocks(dev.asarray(img), DeviceBandNet(), 15, cfg, keep_tile=kept))
    assert [(a, b) for a, b, _ in blocks] == [(a, b) for a, b, _ in ref_blocks]
    for (_, _, d), (_, _, r) in zip(blocks, ref_blocks):
        np.testing.assert_array_equal(host(d), r)
    back = make_plan((37, 70, 61), (55, 123, 101), (4.0, 1.2, 1.2), (2.7, 0.7, 0.7), ResamplingRule(), True)
    np.testing.assert_array_equal(host(labels_refined(iter(blocks), back)), labels_refined(iter(ref_blocks), back))
    lab, probs = labels_faithful(iter(blocks), back, 15, want_probabilities=True)
    ref_lab, ref_probs = labels_faithful(iter(ref_blocks), back, 15, want_probabilities=True)
    np.testing.assert_array_equal(host(lab), ref_lab)
    np.testing.assert_array_equal(host(probs), ref_probs)
    crop = CropInfo((60, 130, 110), ((2, 57), (3, 126), (4, 105)))
    np.testing.assert_array_equal(host(paste_probabilities(probs, crop)), paste_probabilities(ref_probs, crop))


# -- the whole prediction ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ct(small_ct_path):
    return load_volume(small_ct_path)  # 30 slices of the example CT: int32 HU, direction diag(-1,-1,1)


@pytest.mark.parametrize("options", [
    SegmentOptions(mode="fast"),
    SegmentOptions(mode="fast", batch_size=4, fast=FastOptions(roi_crop=True, label_upsampling=False)),
    SegmentOptions(mode="faithful", probabilities=True),
], ids=["fast", "fast-roicrop-batch4", "faithful-probabilities"])
def test_predict_on_the_device_equals_the_host_and_moves_data_once(ct, options):
    bundle = Bundle.load(packaged_model())
    ref = Segmenter(bundle, BandNet(), options).predict(ct)
    seg = Segmenter(bundle, DeviceBandNet(), options)
    seg.predict(ct)  # the first call also uploads the Gaussian map, once per process and device
    COUNTERS.reset()
    pred = seg.predict(ct)
    np.testing.assert_array_equal(pred.labels, ref.labels)
    assert isinstance(pred.labels, np.ndarray) and pred.labels.dtype == np.uint8
    if options.probabilities:
        np.testing.assert_array_equal(pred.probabilities, ref.probabilities)
    assert pred.tiles == ref.tiles and set(pred.timings) >= {"upload", "preprocess", "network", "download"}
    # the CT went up once, as int16 (it is int32 in the file); everything else uploaded is small
    volume_bytes = compact_ct(ct.array).nbytes
    assert compact_ct(ct.array).dtype == np.int16
    big = [b for b in COUNTERS.uploads if b > 100_000]
    assert big == [volume_bytes], COUNTERS.uploads
    assert sum(COUNTERS.uploads) - volume_bytes < 0.05 * volume_bytes
    # what came back: the labels (and probabilities), plus the tile flags of fast mode's ROI
    expected = ct.array.size + (pred.probabilities.nbytes if options.probabilities else 0)
    assert sum(COUNTERS.downloads) - expected <= 8 * pred.tiles + 64, COUNTERS.downloads


def test_the_device_streams_small_logits_blocks():
    bundle = Bundle.load(packaged_model())
    assert Segmenter(bundle, DeviceBandNet()).window.block_rows == DEVICE_BLOCK_ROWS
    assert Segmenter(bundle, BandNet()).window.block_rows is None  # the host: whole ranges for its threads


def test_syncs_do_not_grow_with_the_tiles(ct):
    bundle = Bundle.load(packaged_model())
    syncs = {}
    for step in (1.0, 0.5, 0.3):
        seg = Segmenter(bundle, DeviceBandNet(), SegmentOptions(step=step))
        COUNTERS.reset()
        pred = seg.predict(ct)
        syncs[step] = (pred.tiles, COUNTERS.syncs)
    tiles = [t for t, _ in syncs.values()]
    assert tiles[0] < tiles[1] < tiles[2], syncs
    assert len({s for _, s in syncs.values()}) == 1, syncs  # the same few syncs (crop box) whatever the tiles
    assert syncs[1.0][1] <= 12, syncs
