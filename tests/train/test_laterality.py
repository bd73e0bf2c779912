"""Mirroring the patient's left-right axis (found from the image direction, not the axis number) swaps the
right and left kidney and adrenal labels; mirroring another axis does not; bundles leave that axis out of
test-time mirroring."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from flare_rt.bundle import CTNormalization
from flare_rt.laterality import common_lr_axis, lr_axis, swap_classes, swap_sides
from flare_rt.train.augment import augment_batch
from flare_rt.train.cache import CacheSpec, build_cache
from flare_rt.train.config import AugmentConfig, DataConfig, TinyModel, TrainConfig
from flare_rt.train.dataset import build_index
from flare_rt.train.fingerprint import Fingerprint
from flare_rt.train.prepare import Prepared
from flare_rt.train.release import bundle_meta
from flare_rt.train.sampling import PatchBatches, SamplerSpec

RK, LK, RA, LA = 2, 13, 7, 8
# index x -> patient superior, index y -> posterior, index z -> patient LEFT: the array's left-right axis is
# numpy axis 0 (the one that usually holds the slices)
PERMUTED = (0.0, 0.0, 1.0,
            0.0, 1.0, 0.0,
            1.0, 0.0, 0.0)


def test_left_right_axis_from_the_direction():
    assert lr_axis((1, 0, 0, 0, 1, 0, 0, 0, 1)) == 2  # LPS
    assert lr_axis((-1, 0, 0, 0, -1, 0, 0, 0, 1)) == 2  # RAS (the TotalSegmentator files)
    assert lr_axis(PERMUTED, "stored") == 0
    assert lr_axis(PERMUTED) == 2  # "none" puts the permuted axes back in axial order first
    c, s = np.cos(np.radians(25)), np.sin(np.radians(25))
    assert lr_axis((0, 0, 1, 0, 1, 0, c, s, 0), "stored") == 0  # oblique: still mostly left-right along z
    assert lr_axis(PERMUTED, "LPS") == 2 and lr_axis(PERMUTED, "SPL") == 0  # after reorientation
    assert common_lr_axis([2, 2]) == 2 and common_lr_axis([2, 0]) is None and common_lr_axis([]) is None
    labels = np.array([0, RK, LK, RA, LA, 1, 255], np.uint8)
    assert swap_sides(labels).tolist() == [0, LK, RK, LA, RA, 1, 255]
    assert swap_classes((0, 1, RK, RA)) == (0, 1, LA, LK)


@pytest.fixture(scope="module")
def lateral_case(tmp_path_factory):
    """One case stored with the PERMUTED direction: kidneys and adrenals on both sides of numpy axis 0, and
    an image ramp along that axis (so a mirror is visible in the image)."""
    root = tmp_path_factory.mktemp("lateral") / "F"
    shape = (32, 16, 16)
    labels = np.zeros(shape, np.uint8)
    labels[4:10, 4:12, 4:12] = RK  # low index = patient right
    labels[22:28, 4:12, 4:12] = LK
    labels[10:12, 2:5, 2:5] = RA
    labels[20:22, 2:5, 2:5] = LA
    ramp = np.broadcast_to(np.linspace(-100, 300, shape[0])[:, None, None], shape)
    image = np.where(labels > 0, ramp, -1000.0).astype(np.int16)
    for array, folder, name in ((image, "imagesTr", "c_0000.nii.gz"), (labels, "labelsTr", "c.nii.gz")):
        img = sitk.GetImageFromArray(array)
        img.SetSpacing((2.0, 2.0, 2.0))
        img.SetDirection(PERMUTED)
        (root / folder).mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(img, str(root / folder / name))
    return build_index(root, progress=False)


def mean_position(labels: torch.Tensor, k: int, axis: int) -> float:
    where = torch.nonzero(labels == k)
    return float(where[:, axis].float().mean()) if len(where) else float("nan")


@pytest.mark.parametrize("orientation,axis", [("stored", 0), ("none", 2), ("LPS", 2)])
def test_mirroring_the_left_right_axis_swaps_kidneys_and_adrenals(lateral_case, tmp_path, orientation, axis):
    spec = CacheSpec((2.0, 2.0, 2.0), CTNormalization(100.0, 100.0, -200.0, 400.0), orientation=orientation)
    cache = build_cache(lateral_case.cases, spec, tmp_path / "cache", progress=False)
    prepared = Prepared(lateral_case, ("c",), ("c",), None, cache, spec)
    assert prepared.cases(["c"])[0][2] == axis and prepared.lr_axis() == axis
    patch = (32, 16, 16) if axis == 0 else (16, 16, 32)
    mirror_only = AugmentConfig(p_rotation=0, p_scale=0, p_elastic=0, p_brightness=0, p_gamma=0, p_mirror=0.5)
    batches = PatchBatches(cache, prepared.cases(["c"]), SamplerSpec(patch, (2.0, 2.0, 2.0), 8, 0.0, mirror_only),
                           seed=1)
    seen = {True: 0, False: 0}
    for i in range(3):
        batch = batches[i]
        image, labels = augment_batch(batch, patch)
        flips = batch["matrix"].diagonal(dim1=1, dim2=2) < 0  # (B, 3): mirrored axes
        assert torch.equal(batch["swap_lr"], flips[:, axis])
        for b in range(len(labels)):
            lab, img = labels[b, 0], image[b, 0]
            mirrored = bool(flips[b, axis])
            seen[mirrored] += 1
            # the image shows whether the patch was mirrored along the left-right axis...
            low_side = img.mean(dim=tuple(a for a in range(3) if a != axis))
            nonzero = low_side[low_side != low_side.min()]
            assert (nonzero[0] > nonzero[-1]) == mirrored
            # ...and whatever happened, the right kidney and adrenal lie on the patient's right (low index)
            assert mean_position(lab, RK, axis) < mean_position(lab, LK, axis)
            assert mean_position(lab, RA, axis) < mean_position(lab, LA, axis)
    assert seen[True] >= 3 and seen[False] >= 3
    # a case annotating only its right kidney and adrenal annotates only left ones once mirrored
    one_side = PatchBatches(cache, [("c", (0, RK, RA), axis)], SamplerSpec(patch, (2.0, 2.0, 2.0), 8, 0.0,
                                                                           mirror_only), seed=1)[0]
    for swapped, ann in zip(one_side["swap_lr"].tolist(), one_side["annotated"]):
        assert torch.nonzero(ann).flatten().tolist() == ([0, LA, LK] if swapped else [0, RK, RA])
    # without the swap, a mirrored patch would put the right kidney on the left
    raw = dict(batches[0])
    raw.pop("swap_lr")
    _, unswapped = augment_batch(raw, patch)
    b = int(torch.nonzero(batches[0]["swap_lr"])[0])
    assert mean_position(unswapped[b, 0], RK, axis) > mean_position(unswapped[b, 0], LK, axis)


def test_bundles_leave_the_left_right_axis_out_of_test_time_mirroring(tmp_path):
    config = TrainConfig(name="t", model=TinyModel(), data=DataConfig(index=str(tmp_path / "i.json")),
                         output=str(tmp_path))
    fp = Fingerprint(0.0, 1.0, -1.0, 1.0, (1.0, 1.0, 1.0), (1, 1, 1), 1, "k")
    assert bundle_meta(config, fp, 1, lr_axis=0).mirror_axes == (1, 2)
    assert bundle_meta(config, fp, 1, lr_axis=2).mirror_axes == (0, 1)
    assert bundle_meta(config, fp, 1).mirror_axes == (0, 1, 2)  # unknown: as nnU-Net
