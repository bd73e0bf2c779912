"""Patch sampling: foreground oversampling on annotated classes, padding, and batches that depend only on
their index (the same with or without background workers)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from flare_rt.train.cache import CacheSpec, CachedCase, build_cache
from flare_rt.train.config import AugmentConfig
from flare_rt.train.dataset import build_index
from flare_rt.train.sampling import (PatchBatches, SamplerSpec, choose_origin, extract, make_loader,
                                     origin_range)
from flare_rt.bundle import CTNormalization
from synthetic import flare_dataset

PATCH = (8, 32, 32)


def case_with(locations: dict, annotated, shape=(40, 120, 120)) -> CachedCase:
    z = np.zeros(shape, np.float32)
    return CachedCase("c", z, z.astype(np.uint8), {k: np.asarray(v, np.int32) for k, v in locations.items()},
                      tuple(annotated))


def test_foreground_patches_centre_on_annotated_classes_only():
    case = case_with({1: [[20, 60, 60]], 3: [[5, 10, 100]]}, annotated=(0, 1))
    rng = np.random.default_rng(0)
    for _ in range(50):
        o = choose_origin(rng, case, PATCH, foreground=True)
        assert o.tolist() == [20 - 4, 60 - 16, 60 - 16]  # class 3 is present but not annotated
    both = case_with({1: [[20, 60, 60]], 3: [[20, 30, 90]]}, annotated=(0, 1, 3))
    centres = {tuple(choose_origin(rng, both, PATCH, True) + np.asarray(PATCH) // 2) for _ in range(100)}
    assert centres == {(20, 60, 60), (20, 30, 90)}


def test_oversampling_rate_and_uniform_patches():
    case = case_with({1: [[20, 60, 60]]}, annotated=(0, 1))
    rng = np.random.default_rng(1)
    draws = [choose_origin(rng, case, PATCH, bool(rng.random() < 1 / 3)) for _ in range(3000)]
    on_fg = np.mean([o.tolist() == [16, 44, 44] for o in draws])
    assert on_fg == pytest.approx(1 / 3, abs=0.03)
    lo, hi = origin_range(case.shape, PATCH)
    arr = np.array(draws)
    assert (arr >= lo).all() and (arr <= hi).all() and (arr.min(0) == lo).all() and (arr.max(0) == hi).all()


def test_small_volumes_are_centred_and_padded():
    lo, hi = origin_range((5, 100, 31), (8, 32, 32))
    assert lo.tolist() == [-2, 0, -1] and hi.tolist() == [-1, 68, 0]
    a = np.arange(24).reshape(2, 3, 4)
    out = extract(a, (-1, 1, 2), (3, 4, 6), fill=-7)
    assert out.shape == (4, 3, 4)
    assert (out[0] == -7).all() and (out[3] == -7).all() and (out[1:3, :, 2:] == -7).all()
    assert np.array_equal(out[1:3, :2, :2], a[:, 1:, 2:])


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sampling")
    root = flare_dataset(tmp / "F", 2, partial={1: (1, 3)}, shape=(12, 48, 48))
    index = build_index(root, progress=False)
    cache = build_cache(index.cases, CacheSpec((4.0, 2.4, 2.4), CTNormalization(80.0, 60.0, -50.0, 260.0)),
                        tmp / "cache", progress=False)
    return cache, [(c.id, c.annotated) for c in index.cases]


def test_batches_depend_only_on_their_index(cached):
    cache, cases = cached
    spec = SamplerSpec(PATCH, (4.0, 2.4, 2.4), 2, 1 / 3, AugmentConfig(p_rotation=1, p_elastic=0.5))
    batches = PatchBatches(cache, cases, spec, seed=3).prepare()
    a, b, c = batches[5], batches[5], batches[6]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["matrix"], c["matrix"])
    other_rank = PatchBatches(cache, cases, spec, seed=3, rank=1)[5]
    assert not torch.equal(a["matrix"], other_rank["matrix"])
    loaded = list(make_loader(batches, 4, 8, workers=2, pin_memory=False))
    assert len(loaded) == 4
    for i, got in zip(range(4, 8), loaded):
        want = batches[i]
        assert all(torch.equal(got[k], want[k]) for k in want)
    assert a["annotated"].shape == (2, 15) and a["image"].dtype == torch.float32
    assert a["image"].shape[2:] == a["labels"].shape[2:]


def test_validation_batches_are_plain_patches(cached):
    cache, cases = cached
    spec = SamplerSpec(PATCH, (4.0, 2.4, 2.4), 2, 1.0, None)
    b = PatchBatches(cache, cases, spec, seed=0, stream=1)[0]
    assert set(b) == {"image", "labels", "annotated"}
    assert b["image"].shape == (2, 1, *PATCH)
    for i in range(2):
        present = set(torch.unique(b["labels"][i]).tolist())
        annotated = set(torch.nonzero(b["annotated"][i]).flatten().tolist())
        assert present - {0} and present <= annotated  # foreground patch, annotated labels only
