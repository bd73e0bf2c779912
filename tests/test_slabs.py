"""Big volumes are processed in slabs: the sliding window streams finished rows and the faithful
back-resampling reduces each slab to labels at once, so neither the network-resolution nor the
full-resolution 15-class logits exist at once. Checked with a trivial network (exact answers)."""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from flare_rt.bundle import ResamplingRule
from flare_rt.confidence import ConfidenceRows
from flare_rt.postprocess import labels_faithful, streams
from flare_rt.resample import make_plan, resample
from flare_rt.window import WindowConfig, sliding_window, sliding_window_blocks

K = 15
CENTRES = np.linspace(-2, 2, K).astype(np.float32)


def nearest_centre_net(x):
    """(B, 1, ...) -> (B, K, ...): logit_c = -(x - centre_c)^2; argmax = the nearest centre."""
    return -((x - CENTRES[None, :, None, None, None]) ** 2)


def test_streamed_labels_equal_whole_volume_computation():
    rng = np.random.default_rng(0)
    data = rng.standard_normal((1, 45, 40, 36)).astype(np.float32)
    cfg = WindowConfig((16, 32, 32), 0.5)
    out_shape = (150, 100, 90)
    plan = make_plan(data.shape[1:], out_shape, (4.0, 1.2, 1.2), (1.2, 0.48, 0.48), ResamplingRule(), True)
    assert plan.separate_axis == 0  # nnU-Net's rule for this anisotropy: in-plane order 1, z order 0
    labels, probs = labels_faithful(sliding_window_blocks(data, nearest_centre_net, K, cfg), plan, K, True)
    full = resample(sliding_window(data, nearest_centre_net, K, cfg), plan, compute_dtype=np.float32)
    assert np.array_equal(labels, full.argmax(0).astype(np.uint8))
    e = np.exp(full - full.max(0))
    np.testing.assert_allclose(probs.astype(np.float32), e / e.sum(0), atol=2e-3)


@pytest.mark.parametrize("out_z", [150, 30])  # z upsampled (shared source rows) and downsampled (rows skipped)
def test_threaded_way_back_is_bitwise_the_single_thread_one(out_z):
    """Faithful mode's source rows resampled on threads: the same labels, probabilities and per-row
    callbacks as one thread."""
    data = np.random.default_rng(2).standard_normal((1, 45, 40, 36)).astype(np.float32)
    cfg = WindowConfig((16, 32, 32), 0.5)
    plan = make_plan(data.shape[1:], (out_z, 100, 90), (4.0, 1.2, 1.2), (4.0 * 45 / out_z, 0.48, 0.48),
                     ResamplingRule(), True)
    assert streams(plan)
    results = []
    for threads in (1, 3):
        conf = np.zeros(plan.out_shape, dtype=np.uint8)
        labels, probs = labels_faithful(sliding_window_blocks(data, nearest_centre_net, K, cfg), plan, K, True,
                                        on_plane=ConfidenceRows(conf), threads=threads)
        results.append((labels, probs, conf))
    for a, b in zip(*results):
        assert np.array_equal(a, b)
    assert len(np.unique(results[0][0])) > 5 and results[0][2].min() < 255


def test_big_volume_peak_memory_stays_far_below_the_full_logits():
    """A volume made large on purpose (2000 slices of 256 x 224 on the output grid): 15 classes of
    fp32 logits would take 1.1 GB at network resolution and 6.9 GB on the output grid; the streamed
    pipeline's peak (input, a one-patch-deep blending buffer, one tile's temporaries, the uint8
    labels) is a small fraction of either."""
    rng = np.random.default_rng(1)
    net_shape, out_shape = (800, 160, 140), (2000, 256, 224)
    data = rng.standard_normal((1, *net_shape)).astype(np.float32)
    plan = make_plan(net_shape, out_shape, (4.0, 1.2, 1.2), (1.6, 0.75, 0.75), ResamplingRule(), True)
    cfg = WindowConfig((32, 160, 160), 1.0)
    full_net_logits = K * np.prod(net_shape) * 4
    full_out_logits = K * np.prod(out_shape) * 4
    tracemalloc.start()
    try:
        labels, _ = labels_faithful(sliding_window_blocks(data, nearest_centre_net, K, cfg), plan, K)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert labels.shape == out_shape and labels.dtype == np.uint8
    assert peak < 0.4 * full_net_logits and peak < 0.06 * full_out_logits, (peak, full_net_logits, full_out_logits)
    # the labels are right: nearest centre of the (z-nearest, in-plane linearly interpolated) image
    z = 1000
    src = int(np.floor(800 / 2000 * (z + 0.5) - 0.5 + 0.5))
    plane = resample(nearest_centre_net(data[None, :, src:src + 1])[0], make_plan(
        (1, *net_shape[1:]), (1, *out_shape[1:]), (4.0, 1.2, 1.2), (4.0, 0.75, 0.75), ResamplingRule(), True),
        compute_dtype=np.float32)
    assert (labels[z] == plane.argmax(0)[0]).mean() > 0.999


def test_boundary_refined_labels_equal_faithful_labels():
    """Fast mode's label upsampling interpolates logits only at label boundaries, yet gives the
    argmax of the fully resampled logits (faithful mode) voxel for voxel."""
    from flare_rt.postprocess import labels_refined

    rng = np.random.default_rng(4)
    from scipy.ndimage import gaussian_filter

    data = gaussian_filter(rng.standard_normal((1, 40, 60, 50)), 2).astype(np.float32) * 10
    cfg = WindowConfig((16, 32, 32), 0.5)
    for out_shape in [(100, 150, 130), (30, 40, 35)]:  # upsampling and downsampling
        plan = make_plan(data.shape[1:], out_shape, (4.0, 1.2, 1.2), (1.6, 0.48, 0.48), ResamplingRule(), True)
        faithful, _ = labels_faithful(sliding_window_blocks(data, nearest_centre_net, K, cfg), plan, K)
        fast = labels_refined(sliding_window_blocks(data, nearest_centre_net, K, cfg), plan)
        assert fast.shape == out_shape
        assert (fast == faithful).mean() > 0.9999  # float rounding at exact ties only
