"""The whole pipeline on a real CT with a trivial network whose answer is known (intensity bands),
so that the effect of each fast-mode trick is measured without a model's own instability."""
from __future__ import annotations


import numpy as np
import pytest

from flare_rt.bundle import Bundle
from flare_rt.resources import packaged_model
from trivial_nets import BandNet, expected_bands
from flare_rt.errors import ConfigError
from flare_rt.io import load_volume
from flare_rt.pipeline import FastOptions, SegmentOptions, Segmenter, parse_fast_options

@pytest.fixture(scope="module")
def ct(shared_data):
    return load_volume(shared_data / "ircad01_ct.nii.gz")


@pytest.fixture(scope="module")
def bundle():
    return Bundle.load(packaged_model())


def run(bundle, ct, **kw):
    return Segmenter(bundle, BandNet(), SegmentOptions(**kw)).predict(ct)


def test_faithful_band_labels_follow_the_image(bundle, ct):
    pred = run(bundle, ct, mode="faithful")
    assert pred.labels.shape == ct.array.shape and pred.labels.dtype == np.uint8
    expected = expected_bands(ct.array, bundle.meta.normalization)
    # resampling to 4 x 1.2 x 1.2 mm and back blurs edges only
    assert (pred.labels == expected).mean() > 0.8  # 0.83 measured: 15 narrow bands on a noisy CT


@pytest.fixture(scope="module")
def faithful(bundle, ct):
    return run(bundle, ct, mode="faithful")


@pytest.mark.parametrize("fast,step,min_agreement", [
    (FastOptions(), None, 0.9999),  # air tiles skipped, boundary-refined label upsampling, float32 resampling
    (FastOptions(roi=False, label_upsampling=False), None, 0.9999),  # float32 instead of float64 resampling only
    (FastOptions(), 0.75, 0.9999),  # this network is tile-independent: only blending changes
    (FastOptions(roi_crop=True), None, 0.85),  # cropping moves the resampling grid: noisy bands shift
])
def test_fast_mode_tricks_with_trivial_network(bundle, ct, faithful, fast, step, min_agreement):
    pred = run(bundle, ct, mode="fast", fast=fast, step=step)
    agreement = (pred.labels == faithful.labels).mean()
    assert agreement > min_agreement, (fast, step, agreement)


def body_tiles(bundle, ct, step: float) -> tuple[int, int]:
    """Tiles of the padded network-resolution grid that hold a body voxel (> -500 HU), computed apart from
    the pipeline: (with body, all)."""
    from flare_rt.preprocess import compute_new_shape, nonzero_crop
    from flare_rt.resample import upsample_labels_nearest
    from flare_rt.window import WindowConfig, pad_to_patch, tile_origins

    meta = bundle.meta
    crop = nonzero_crop(ct.array)
    net_shape = compute_new_shape(crop.shape_after, ct.spacing, meta.spacing)
    body = upsample_labels_nearest(ct.array[crop.slices] > -500, net_shape)
    padded, _ = pad_to_patch(body[None], meta.patch_size)
    origins = tile_origins(padded.shape[1:], WindowConfig(meta.patch_size, step))
    pz, py, px = meta.patch_size
    hit = [o for o in origins if padded[0, o[0]:o[0] + pz, o[1]:o[1] + py, o[2]:o[2] + px].any()]
    return len(hit), len(origins)


def test_roi_skipping_removes_the_air_tiles_of_a_real_ct(bundle, shared_data):
    ct = load_volume(shared_data / "ts_dicom")  # 512x512x20 with air around the body
    with_body, total = body_tiles(bundle, ct, 0.5)
    assert run(bundle, ct, mode="faithful").tiles == total  # faithful mode runs nnU-Net's whole grid
    assert with_body < total  # measured: 20 of 24
    assert run(bundle, ct, mode="fast").tiles == with_body
    assert run(bundle, ct, mode="fast", fast=FastOptions(roi=False)).tiles == total


def test_parse_fast_options():
    assert parse_fast_options(["roi=0", "compute_dtype=float64", "body_margin=2"]) == \
        FastOptions(roi=False, compute_dtype="float64", body_margin=2)
    assert parse_fast_options([]) is None
    with pytest.raises(ConfigError, match="KEY in"):
        parse_fast_options(["bogus=1"])
    with pytest.raises(ConfigError, match="KEY in"):
        parse_fast_options(["step=0.75"])  # the tile step is --step, one setting for both modes
    with pytest.raises(ConfigError, match="takes 0/1, got 'maybe'"):
        parse_fast_options(["roi=maybe"])
    with pytest.raises(ConfigError, match="compute_dtype must be one of"):
        parse_fast_options(["compute_dtype=float16"])
    with pytest.raises(ConfigError, match="body_margin must be >= 0"):
        parse_fast_options(["body_margin=-1"])
    with pytest.raises(ConfigError, match="mode must be one of"):
        SegmentOptions(mode="quick")
    with pytest.raises(ConfigError, match="fast-mode options were given with --mode faithful"):
        SegmentOptions(mode="faithful", fast=FastOptions(roi=False))
    assert SegmentOptions(mode="faithful").fast_options is None
    assert SegmentOptions().fast_options == FastOptions()
