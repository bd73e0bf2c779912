"""The runtime's per-voxel confidence map: round(255 * max softmax) of the logits the labels come from,
streamed with the labels, the same labels with or without it, and full confidence where nothing ran."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from flare_rt.bundle import Bundle
from flare_rt.confidence import confidence_u8
from flare_rt.io import Volume, load_volume
from flare_rt.pipeline import SegmentOptions, Segmenter
from flare_rt.resources import packaged_model

K = 15
CENTRES = np.linspace(-3, 2, K).astype(np.float32)


class BandNet:
    """Logit_c = -(x - centre_c)^2: labels are intensity bands, confidence varies smoothly within them."""

    def __call__(self, x):
        return -((x - CENTRES[None, :, None, None, None]) ** 2)


def test_confidence_u8_values():
    logits = np.zeros((K, 2, 3), np.float32)
    assert (confidence_u8(logits) == round(255 / K)).all()
    logits[3, 0, 0] = 50.0
    logits[0, 1, :] = 1.0  # the window's "no tile ran here" background
    conf = confidence_u8(logits)
    assert conf[0, 0] == 255 and (conf[1] == 255).all() and conf.dtype == np.uint8
    two = np.array([[0.0], [np.log(3.0)]] + [[-1e9]] * (K - 2), np.float32)  # p = 0.25, 0.75
    assert confidence_u8(two)[0] == round(0.75 * 255)


@pytest.fixture(scope="module")
def ct(shared_data):
    return load_volume(shared_data / "ts_example_ct_sm.nii.gz")


def test_confidence_map_matches_the_probabilities_and_keeps_the_labels(ct):
    bundle = Bundle.load(packaged_model())
    plain = Segmenter(bundle, BandNet(), SegmentOptions()).predict(ct)
    with_conf = Segmenter(bundle, BandNet(), SegmentOptions(confidence=True)).predict(ct)
    probs = Segmenter(bundle, BandNet(), SegmentOptions(mode="faithful", probabilities=True)).predict(ct)
    assert plain.confidence is None and probs.confidence is None
    conf = with_conf.confidence
    assert conf.shape == ct.array.shape and conf.dtype == np.uint8
    assert np.array_equal(with_conf.labels, plain.labels)  # fast mode's labels, with or without the map
    assert np.array_equal(with_conf.labels, probs.labels)
    expected = np.rint(255 * probs.probabilities.astype(np.float32).max(0))
    assert np.abs(conf.astype(np.int16) - expected).max() <= 1  # float16 probabilities
    assert 20 < conf.min() < 200 and conf.max() > 240  # unsure at band edges, sure inside bands
    faithful = Segmenter(bundle, BandNet(), SegmentOptions(mode="faithful", confidence=True)).predict(ct)
    assert np.array_equal(faithful.confidence, conf) and np.array_equal(faithful.labels, probs.labels)


def test_outside_the_nonzero_crop_the_confidence_is_full(ct):
    array = np.pad(ct.array, ((0, 0), (0, 0), (0, 9)))
    padded = Volume(array, replace(ct.geometry, size=array.shape[::-1]), "padded")
    pred = Segmenter(Bundle.load(packaged_model()), BandNet(), SegmentOptions(confidence=True)).predict(padded)
    assert (pred.confidence[:, :, -9:] == 255).all() and (pred.labels[:, :, -9:] == 0).all()
    assert pred.confidence[:, :, :-9].max() < 255
