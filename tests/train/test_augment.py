"""Augmentation: one random draw warps image and labels alike; extents are exact; intensity transforms."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from flare_rt.train.augment import (SampleDraw, augment_batch, brightness, draw_sample, gamma, sampling_grid,
                                    source_extent, spatial_matrix)
from flare_rt.train.config import AugmentConfig
from flare_rt.train.sampling import draws_to_tensors, extract, source_region

SPACING = (4.0, 2.4, 2.4)
PATCH = (16, 48, 40)


def blobs(shape=(40, 100, 96)) -> np.ndarray:
    """Three ellipsoids and a box: labels 1..4 with large interiors."""
    z, y, x = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    lab = np.zeros(shape, np.uint8)
    lab[((z - 20) / 12) ** 2 + ((y - 40) / 25) ** 2 + ((x - 35) / 20) ** 2 < 1] = 1
    lab[((z - 18) / 8) ** 2 + ((y - 70) / 12) ** 2 + ((x - 70) / 14) ** 2 < 1] = 2
    lab[((z - 25) / 6) ** 2 + ((y - 25) / 10) ** 2 + ((x - 72) / 10) ** 2 < 1] = 3
    lab[5:12, 60:90, 15:40] = 4
    return lab


def warped(labels: np.ndarray, channels: list[np.ndarray], draws: list[SampleDraw], origins):
    """Sample patches of ``labels`` and image ``channels`` through the sampler's region logic."""
    regions, labs, centres = [], [], []
    for d, o in zip(draws, origins):
        lo, hi, c = source_region(np.asarray(o), d, PATCH)
        regions.append(np.stack([extract(ch, lo, hi, 0.0) for ch in channels]))
        labs.append(extract(labels, lo, hi, 0)[None])
        centres.append(c)
    shape = np.max([r.shape[1:] for r in regions], axis=0)
    pad = lambda a: np.pad(a, [(0, 0)] + [(0, int(s) - n) for n, s in zip(a.shape[1:], shape)])  # noqa: E731
    batch = {"image": torch.from_numpy(np.stack([pad(r) for r in regions]).astype(np.float32)),
             "labels": torch.from_numpy(np.stack([pad(a) for a in labs])), **draws_to_tensors(draws, centres)}
    return augment_batch(batch, PATCH)


def test_image_and_labels_stay_aligned_under_rotation_scaling_elastic_and_mirroring():
    labels = blobs()
    # interior: the whole 3x3x3 neighbourhood has one label, so trilinear interpolation anywhere in the
    # cell around the nearest voxel gives exactly that label
    interior = (ndimage.maximum_filter(labels, 3) == ndimage.minimum_filter(labels, 3)).astype(np.float32)
    cfg = AugmentConfig(p_rotation=1, p_scale=1, p_elastic=1, p_mirror=0.5, p_brightness=0, p_gamma=0,
                        elastic_magnitude_mm=8.0)
    rng = np.random.default_rng(3)
    draws = [draw_sample(rng, cfg, SPACING, PATCH) for _ in range(4)]
    origins = [(12, 26, 28), (10, 30, 20), (14, 40, 40), (8, 20, 30)]
    image, lab = warped(labels, [labels.astype(np.float32), interior], draws, origins)
    assert image.shape == (4, 2, *PATCH) and lab.shape == (4, 1, *PATCH)
    sure = image[:, 1] > 0.999  # every interpolation corner lies in a region interior
    assert sure.float().mean() > 0.5
    assert torch.equal(image[:, 0][sure].round(), lab[:, 0][sure].float())
    # the labels really moved: they differ from the unwarped crops
    plain = np.stack([labels[o[0]:o[0] + PATCH[0], o[1]:o[1] + PATCH[1], o[2]:o[2] + PATCH[2]] for o in origins])
    assert (lab[:, 0].numpy() != plain).mean() > 0.05
    assert len(np.unique(lab.numpy())) >= 4


def test_misaligned_labels_would_be_caught():
    """The alignment check above fails when the labels are warped by another draw."""
    labels = blobs()
    interior = (ndimage.maximum_filter(labels, 3) == ndimage.minimum_filter(labels, 3)).astype(np.float32)
    cfg = AugmentConfig(p_rotation=1, p_scale=1, p_elastic=0, p_mirror=0, p_brightness=0, p_gamma=0)
    rng = np.random.default_rng(5)
    a, b = draw_sample(rng, cfg, SPACING, PATCH), draw_sample(rng, cfg, SPACING, PATCH)
    image, _ = warped(labels, [labels.astype(np.float32), interior], [a], [(12, 26, 28)])
    _, other = warped(labels, [labels.astype(np.float32)], [b], [(12, 26, 28)])
    sure = image[:, 1] > 0.999
    assert not torch.equal(image[:, 0][sure].round(), other[:, 0][sure].float())


def test_identity_draw_returns_the_crop_and_mirroring_flips_exactly():
    rng = np.random.default_rng(0)
    vol = rng.normal(size=(30, 70, 60)).astype(np.float32)
    labels = rng.integers(0, 5, size=vol.shape).astype(np.uint8)
    origin = (5, 10, 12)
    crop = vol[5:21, 10:58, 12:52]
    lab_crop = labels[5:21, 10:58, 12:52]
    ident = SampleDraw(spatial_matrix((0, 0, 0), 1.0, (1, 1, 1), SPACING).astype(np.float32),
                       np.zeros((3, 2, 2, 2), np.float32), 0.0, 1.0, False)
    image, lab = warped(labels, [vol], [ident], [origin])
    np.testing.assert_allclose(image[0, 0].numpy(), crop, atol=1e-5)
    assert np.array_equal(lab[0, 0].numpy(), lab_crop)
    for flips in [(-1, 1, 1), (1, -1, 1), (1, 1, -1), (-1, -1, -1)]:
        d = SampleDraw(spatial_matrix((0, 0, 0), 1.0, flips, SPACING).astype(np.float32), ident.elastic, 0.0, 1.0,
                       False)
        image, lab = warped(labels, [vol], [d], [origin])
        axes = tuple(i for i, f in enumerate(flips) if f < 0)
        np.testing.assert_allclose(image[0, 0].numpy(), np.flip(crop, axes), atol=1e-5)
        assert np.array_equal(lab[0, 0].numpy(), np.flip(lab_crop, axes))


@pytest.mark.parametrize("p_elastic", [0.0, 1.0])
def test_source_extent_bounds_every_sampled_position(p_elastic):
    cfg = AugmentConfig(p_rotation=1, p_scale=1, p_elastic=p_elastic, p_mirror=0.5)
    rng = np.random.default_rng(1)
    for _ in range(5):
        d = draw_sample(rng, cfg, SPACING, PATCH)
        lo, hi = source_extent(d, PATCH)
        t = draws_to_tensors([d], [np.zeros(3)])
        grid = sampling_grid(t["centre"], t["matrix"], t["elastic"], PATCH, (3, 3, 3))
        pos = ((grid[0].reshape(-1, 3).flip(1) + 1) / 2 * 2).numpy().astype(np.float64)  # region 3: voxel = 2 * u
        assert (pos.min(0) >= lo - 1e-4).all() and (pos.max(0) <= hi + 1e-4).all()
        if p_elastic == 0:  # a linear map of the patch box: the corners attain the bounds
            np.testing.assert_allclose(pos.min(0), lo, atol=1e-3)
            np.testing.assert_allclose(pos.max(0), hi, atol=1e-3)


def test_rotation_is_rigid_in_millimetres():
    m = spatial_matrix(np.radians((20, -10, 30)), 1.0, (1, 1, 1), SPACING)
    mm = np.diag(SPACING) @ m @ np.diag(1 / np.asarray(SPACING))
    np.testing.assert_allclose(mm @ mm.T, np.eye(3), atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(mm), 1.0, atol=1e-12)


def test_brightness_and_gamma_keep_statistics_and_skip_untouched_patches():
    rng = np.random.default_rng(2)
    x = torch.from_numpy(rng.normal(0.3, 1.2, size=(3, 1, 8, 16, 16)).astype(np.float32))
    y = brightness(x, torch.tensor([0.5, 0.0, -0.25]))
    np.testing.assert_allclose((y - x).numpy()[:, 0, 0, 0, 0], [0.5, 0.0, -0.25], atol=1e-6)
    g = gamma(x, torch.tensor([0.7, 1.0, 1.4]), torch.tensor([False, False, True]))
    assert torch.equal(g[1], x[1])
    for i in (0, 2):
        assert not torch.allclose(g[i], x[i])
        assert g[i].mean().item() == pytest.approx(x[i].mean().item(), abs=1e-4)
        assert g[i].std().item() == pytest.approx(x[i].std().item(), rel=1e-4)


def test_draws_are_reproducible_and_respect_probabilities():
    cfg = AugmentConfig()
    a = draw_sample(np.random.default_rng(7), cfg, SPACING, PATCH)
    b = draw_sample(np.random.default_rng(7), cfg, SPACING, PATCH)
    assert np.array_equal(a.matrix, b.matrix) and np.array_equal(a.elastic, b.elastic)
    none = [draw_sample(np.random.default_rng(i), AugmentConfig.none(), SPACING, PATCH) for i in range(20)]
    ident = spatial_matrix((0, 0, 0), 1.0, (1, 1, 1), SPACING)
    assert all(np.allclose(d.matrix, ident) and not d.elastic.any() and d.gamma == 1 and d.brightness == 0
               for d in none)
