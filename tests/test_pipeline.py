"""The whole pipeline on a real CT with a trivial network whose answer is known (intensity bands),
so that the effect of each fast-mode trick is measured without a model's own instability."""
from __future__ import annotations


import numpy as np
import pytest

from flare_rt.bundle import Bundle
from flare_rt.resources import packaged_model
from flare_rt.errors import ConfigError
from flare_rt.io import load_volume
from flare_rt.pipeline import FastOptions, SegmentOptions, Segmenter, parse_fast_options

K = 15
CENTRES = np.linspace(-3, 2, K).astype(np.float32)


class BandNet:
    """Logit_c = -(x - centre_c)^2 on the normalised image: labels are intensity bands."""

    def __call__(self, x):
        return -((x - CENTRES[None, :, None, None, None]) ** 2)


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
    norm = bundle.meta.normalization
    x = (np.clip(ct.array.astype(np.float32), norm.lower, norm.upper) - norm.mean) / norm.std
    expected = np.abs(x[..., None] - CENTRES).argmin(-1)
    # resampling to 4 x 1.2 x 1.2 mm and back blurs edges only
    assert (pred.labels == expected).mean() > 0.8  # 0.83 measured: 15 narrow bands on a noisy CT


@pytest.fixture(scope="module")
def faithful(bundle, ct):
    return run(bundle, ct, mode="faithful")


@pytest.mark.parametrize("fast,min_agreement", [
    (FastOptions(), 0.9999),  # air tiles skipped, boundary-refined label upsampling, float32 resampling
    (FastOptions(roi=False, label_upsampling=False), 0.9999),  # float32 instead of float64 resampling only
    (FastOptions(step=0.75), 0.9999),  # this network is tile-independent: only blending changes
    (FastOptions(roi_crop=True), 0.85),  # cropping moves the resampling grid: noisy bands shift
])
def test_fast_mode_tricks_with_trivial_network(bundle, ct, faithful, fast, min_agreement):
    pred = run(bundle, ct, mode="fast", fast=fast)
    agreement = (pred.labels == faithful.labels).mean()
    print(fast, "voxel agreement with faithful", agreement, "tiles", pred.tiles, "of", faithful.tiles)
    assert agreement > min_agreement
    assert pred.tiles <= faithful.tiles


def test_parse_fast_options():
    assert parse_fast_options(["roi=0", "step=0.75", "body_margin=2"]) == FastOptions(roi=False, step=0.75, body_margin=2)
    with pytest.raises(ConfigError, match="KEY in"):
        parse_fast_options(["bogus=1"])
    with pytest.raises(ConfigError, match="takes 0/1, got 'maybe'"):
        parse_fast_options(["roi=maybe"])
    with pytest.raises(ConfigError, match="mode must be one of"):
        SegmentOptions(mode="quick")
