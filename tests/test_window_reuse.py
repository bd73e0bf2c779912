"""The sliding window with a backend that reuses its output buffer (as TensorRT's runner does) and
returns float16: with and without mirroring TTA, the result equals that of a fresh-array float32 network."""
from __future__ import annotations

import numpy as np
import pytest

from flare_rt.window import WindowConfig, sliding_window

K = 3


def net(x):
    return np.concatenate([x * (k + 1) - k for k in range(K)], axis=1).astype(np.float32)


class ReusingNet:
    """Same values, written into one float16 buffer per batch shape and returned every call."""

    def __init__(self):
        self.buffers = {}

    def __call__(self, x):
        out = self.buffers.setdefault(x.shape, np.empty((x.shape[0], K, *x.shape[2:]), np.float16))
        out[...] = net(x)
        return out


@pytest.mark.parametrize("mirror_axes", [(), (0, 1, 2)])
def test_reused_fp16_output_buffers_give_the_same_blend(mirror_axes):
    image = np.random.default_rng(0).standard_normal((1, 20, 24, 28)).astype(np.float32)
    cfg = WindowConfig(patch_size=(8, 16, 16), step=0.5, batch_size=3, mirror_axes=mirror_axes)
    reference = sliding_window(image, net, K, cfg)
    reused = ReusingNet()
    got = sliding_window(image, reused, K, cfg)
    assert len(reused.buffers) >= 1
    # fp16 rounding of the logits (|x| < ~15 here) is the only difference
    np.testing.assert_allclose(got, reference, atol=0.02, rtol=2e-3)
