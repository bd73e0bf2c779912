"""Sliding window: tile placement, Gaussian map, blending, padding, TTA, streaming — with trivial
networks (exact answers) and against nnU-Net's own predictor with a small torch network."""
from __future__ import annotations

import json

import numpy as np
import pytest

from flare_rt.errors import ConfigError
from flare_rt.window import (WindowConfig, compute_steps, gaussian_map, over_classes, pad_to_patch, sliding_window,
                             sliding_window_blocks)

PATCH = (8, 16, 12)


def two_channel(x):
    """(B, 1, ...) -> (B, 2, ...): [2x, -x + 1]; blending any mix of tiles reproduces it exactly."""
    return np.concatenate([2 * x, 1 - x], axis=1)


@pytest.mark.parametrize("size", [(8, 16, 12), (9, 40, 13), (31, 17, 50), (100, 16, 12)])
@pytest.mark.parametrize("step", [0.5, 0.75, 1.0])
def test_steps_match_nnunet(size, step):
    sw = pytest.importorskip("nnunetv2.inference.sliding_window_prediction")
    assert compute_steps(size, PATCH, step) == sw.compute_steps_for_sliding_window(size, PATCH, step)


def test_steps_cover_image_evenly():
    steps = compute_steps((100,), (32,), 0.5)
    # n = ceil((100 - 32) / 16) + 1 = 6 tiles, evenly spaced over [0, 68]: 68 / 5 = 13.6 apart, rounded
    assert steps == [[0, 14, 27, 41, 54, 68]]


def test_gaussian_matches_nnunet():
    torch = pytest.importorskip("torch")
    sw = pytest.importorskip("nnunetv2.inference.sliding_window_prediction")
    ref = sw.compute_gaussian((32, 128, 192), 1.0 / 8, 10, dtype=torch.float32, device=torch.device("cpu")).numpy()
    ours = gaussian_map((32, 128, 192))
    assert ours.dtype == np.float32 and ours.shape == (32, 128, 192)
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-12)
    assert ours.max() == pytest.approx(10.0) and ours.min() > 0


@pytest.mark.parametrize("shape", [(1, 8, 16, 12), (1, 20, 35, 29), (1, 5, 7, 30), (1, 33, 16, 12)])
def test_trivial_network_is_reproduced_exactly(shape):
    img = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    out = sliding_window(img, two_channel, 2, WindowConfig(PATCH, step=0.5, batch_size=3))
    assert out.shape == (2, *shape[1:])
    np.testing.assert_allclose(out[0], 2 * img[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[1], 1 - img[0], rtol=1e-5, atol=1e-5)


def test_tta_of_flip_equivariant_network_is_identity():
    img = np.random.default_rng(1).standard_normal((1, 12, 20, 15)).astype(np.float32)
    plain = sliding_window(img, two_channel, 2, WindowConfig(PATCH))
    tta = sliding_window(img, two_channel, 2, WindowConfig(PATCH, mirror_axes=(0, 1, 2)))
    np.testing.assert_allclose(tta, plain, rtol=1e-5, atol=1e-5)


def test_blocks_stream_in_order_and_cover_all_rows():
    img = np.random.default_rng(2).standard_normal((1, 50, 16, 12)).astype(np.float32)
    cfg = WindowConfig(PATCH, step=0.5)
    rows = []
    for z0, z1, blk in sliding_window_blocks(img, two_channel, 2, cfg):
        assert blk.shape == (2, z1 - z0, 16, 12)
        rows.append((z0, z1))
    assert rows[0][0] == 0 and rows[-1][1] == 50
    assert all(a[1] == b[0] for a, b in zip(rows, rows[1:]))
    assert len(rows) > 3  # streamed, not one block


@pytest.mark.parametrize("skip", [False, True])
def test_block_rows_cap_the_blocks_and_leave_the_values(skip):
    img = np.random.default_rng(3).standard_normal((1, 50, 16, 12)).astype(np.float32)
    keep = (lambda o: o[0] != 0) if skip else None  # some rows covered by no kept tile
    whole = list(sliding_window_blocks(img, two_channel, 2, WindowConfig(PATCH, step=0.5), keep_tile=keep))
    split = list(sliding_window_blocks(img, two_channel, 2, WindowConfig(PATCH, step=0.5, block_rows=3),
                                       keep_tile=keep))
    assert max(z1 - z0 for z0, z1, _ in whole) > 3
    assert all(0 < z1 - z0 <= 3 for z0, z1, _ in split)
    assert split[0][0] == 0 and split[-1][1] == 50 and all(a[1] == b[0] for a, b in zip(split, split[1:]))
    np.testing.assert_array_equal(np.concatenate([b for _, _, b in split], axis=1),
                                  np.concatenate([b for _, _, b in whole], axis=1))
    with pytest.raises(ConfigError, match="block rows"):
        WindowConfig(PATCH, block_rows=0)


def test_skipped_tiles_give_certain_background():
    img = np.zeros((1, 40, 16, 12), dtype=np.float32)
    cfg = WindowConfig(PATCH, step=0.5)
    calls = []

    def net(x):
        calls.append(len(x))
        return two_channel(x)

    out = sliding_window(img, net, 2, cfg, keep_tile=lambda o: o[0] < 10)
    kept = [o for o in [(z,) for z in compute_steps((40,), (8,), 0.5)[0]] if o[0] < 10]
    assert sum(calls) == len(kept)
    assert np.all(out[:, 20:] == np.array([1.0, 0.0])[:, None, None, None])  # uncovered rows: background
    assert np.all(out.argmax(0)[20:] == 0)


@pytest.mark.parametrize("threads", [1, 2, 3, 4])
def test_over_classes_covers_every_class_once(threads):
    seen = np.zeros(15, dtype=int)

    def mark(k):
        seen[k] += 1

    over_classes(mark, 15, np, threads)
    assert seen.tolist() == [1] * 15


@pytest.mark.parametrize("step", [0.5, 0.3, 0.9])  # steps below and above half a patch: shifts with and without overlap
def test_threaded_blend_is_bitwise_the_single_thread_one(step):
    """The CPU blend split over classes on threads gives the same floats as one thread, skipped tiles too."""
    img = np.random.default_rng(5).standard_normal((1, 45, 30, 20)).astype(np.float32)
    w = np.random.default_rng(6).standard_normal((7, 1, 1, 1, 1)).astype(np.float32)

    def net(x):  # 7 classes, not a blend-invariant function, so rounding differences would show
        return np.tanh(x[:, :1] * w.reshape(1, 7, 1, 1, 1))

    outs = [sliding_window(img, net, 7, WindowConfig(PATCH, step=step, threads=t), keep_tile=lambda o: o[1] < 10)
            for t in (1, 3)]
    assert np.array_equal(outs[0], outs[1])


def test_padding_is_symmetric_and_reverted():
    img = np.ones((1, 3, 16, 5), dtype=np.float32)
    padded, unpad = pad_to_patch(img, PATCH)
    assert padded.shape == (1, 8, 16, 12)
    assert unpad == (slice(2, 5), slice(0, 16), slice(3, 8))
    assert padded[0][unpad].sum() == img.sum() and padded.sum() == img.sum()


def test_bad_config_is_rejected_with_the_value():
    with pytest.raises(ConfigError, match="got 1.5"):
        WindowConfig(PATCH, step=1.5)
    with pytest.raises(ConfigError, match="got 0"):
        WindowConfig(PATCH, batch_size=0)
    with pytest.raises(ConfigError, match="blend threads must be >= 1, got 0"):
        WindowConfig(PATCH, threads=0)


@pytest.mark.parametrize("mirror", [False, True])
def test_matches_nnunet_predictor_sliding_window(mirror, demo_nnunet_dir):
    """nnU-Net's own predict_sliding_window_return_logits with a small random torch network."""
    torch = pytest.importorskip("torch")
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv3d(4, 15, 1)).eval()
    plans = json.loads((demo_nnunet_dir / "plans.json").read_text())
    dataset = json.loads((demo_nnunet_dir / "dataset.json").read_text())
    pm = PlansManager(plans)
    cm = pm.get_configuration("3d_fullres")
    pred = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=mirror,
                           perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False)
    pred.manual_initialization(net, pm, cm, [net.state_dict()], dataset, "nnUNetTrainer", (0, 1, 2))
    img = np.random.default_rng(3).standard_normal((1, 45, 150, 210)).astype(np.float32)
    with torch.no_grad():
        ref = pred.predict_sliding_window_return_logits(torch.from_numpy(img)).float().numpy()

    def network(x):
        with torch.no_grad():
            return net(torch.from_numpy(np.ascontiguousarray(x))).numpy()

    ours = sliding_window(img, network, 15, WindowConfig(cm.patch_size, 0.5, mirror_axes=(0, 1, 2) if mirror else ()))
    # nnU-Net accumulates in fp16 with the map scaled to 10: products with the map's tiny edge values
    # underflow, so voxels covered only by tile edges (image borders) carry errors up to ~0.5; elsewhere
    # fp16 steps of 2**-6..2**-3 on sums of ~10-80 bound the error to a few 1e-2.
    err = np.abs(ours - ref)
    assert np.median(err) < 1e-3
    assert np.quantile(err, 0.99) < 6e-2
    assert (ours.argmax(0) == ref.argmax(0)).mean() > 0.99
    if not mirror:  # a convolution is tile-independent away from tile borders: fp32 blending is closer to it
        with torch.no_grad():
            direct = net(torch.from_numpy(img[None]))[0].numpy()
        ours_err, ref_err = np.abs(ours - direct), np.abs(ref - direct)
        assert np.quantile(ours_err, 0.999) < 0.5 * np.quantile(ref_err, 0.999)
        assert ours_err.max() < ref_err.max()
