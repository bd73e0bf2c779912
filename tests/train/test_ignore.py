"""The ignore label (low-confidence pseudo-labels): no loss and no gradient, never a foreground centre, not
scored by online validation, not CT foreground for the fingerprint, and warped with its image voxels."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage

from flare_rt.labels import IGNORE_ID
from flare_rt.train.augment import draw_sample
from flare_rt.train.cache import class_locations
from flare_rt.train.config import AugmentConfig, LossConfig
from flare_rt.train.dataset import build_index, load_case
from flare_rt.train.dice import confusion
from flare_rt.train.fingerprint import case_statistics
from flare_rt.train.loss import dice_ce, segmentation_loss
from synthetic import flare_dataset
from test_augment import PATCH, SPACING, blobs, warped

C = 15


def ignored_setup(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, C, 4, 6, 6, generator=g, dtype=torch.float64)
    target = torch.randint(0, 4, (2, 1, 4, 6, 6), generator=g)
    ignore = torch.rand(target.shape, generator=g) < 0.3
    return logits, target.masked_fill(ignore, IGNORE_ID), ignore[:, 0]


@pytest.mark.parametrize("batch_dice", [True, False])
def test_ignored_voxels_carry_no_loss_and_no_gradient(batch_dice):
    logits, target, ignore = ignored_setup()
    annotated = torch.ones(2, C, dtype=torch.bool)
    annotated[0, 5:] = False
    cfg = LossConfig(batch_dice=batch_dice)
    base = dice_ce(logits, target, annotated, cfg)
    scrambled = logits.clone()
    scrambled[:, :, ignore[0] | ignore[1]] = torch.randn_like(scrambled[:, :, ignore[0] | ignore[1]]) * 10
    other = logits.clone()
    other.permute(0, 2, 3, 4, 1)[ignore] = scrambled.permute(0, 2, 3, 4, 1)[ignore]
    assert dice_ce(other, target, annotated, cfg).item() == pytest.approx(base.item(), abs=1e-12)
    x = logits.clone().requires_grad_(True)
    segmentation_loss(x, target, annotated, cfg).backward()
    grad = x.grad.permute(0, 2, 3, 4, 1)
    assert grad[ignore].abs().max().item() == 0 and grad[~ignore].abs().max().item() > 1e-6
    # ...and were the ignored voxels background instead, the loss would differ
    as_background = target.masked_fill(target == IGNORE_ID, 0)
    assert abs(dice_ce(logits, as_background, annotated, cfg).item() - base.item()) > 1e-3
    everything = torch.full_like(target, IGNORE_ID)
    assert torch.isfinite(dice_ce(logits, everything, annotated, cfg))


def test_ignored_voxels_are_not_scored_by_validation():
    target = torch.tensor([[[1, 1, IGNORE_ID, IGNORE_ID, 0]]])
    pred = torch.tensor([[[1, 0, 1, 2, 0]]])
    counts = confusion(pred, target, torch.ones(1, C, dtype=torch.bool), C)
    assert counts[:, 1].tolist() == [1, 0, 1] and counts[:, 2].tolist() == [0, 0, 0]  # tp, fp, fn


def test_ignored_voxels_are_never_foreground(tmp_path):
    labels = np.zeros((10, 30, 30), np.uint8)
    labels[2:5, 3:8, 3:8] = 1
    labels[5:9, 10:28, 10:28] = IGNORE_ID
    assert set(class_locations(labels)) == {1}
    # a dataset case whose label map holds ignored voxels: indexed (255 is not a class), and the fingerprint
    # takes no CT value from them
    root = flare_dataset(tmp_path / "F", 1, shape=(12, 40, 40))
    lab_path = root / "labelsTr" / "case_00.nii.gz"
    img = sitk.ReadImage(str(lab_path))
    arr = sitk.GetArrayFromImage(img)
    air = sitk.GetArrayFromImage(sitk.ReadImage(str(root / "imagesTr" / "case_00_0000.nii.gz"))) < -500
    arr[air] = IGNORE_ID
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(img)
    sitk.WriteImage(out, str(lab_path))
    entry = build_index(root, progress=False).case("case_00")
    assert IGNORE_ID not in entry.present and entry.annotated == (0, 1, 2, 3, 5)
    assert load_case(entry)[1].max() == IGNORE_ID
    stats = case_statistics(entry)
    assert stats.foreground.min() > -300  # organ HU only, no air


def test_ignored_voxels_stay_aligned_under_augmentation():
    labels = blobs()
    labels[labels == 3] = IGNORE_ID  # one blob ignored
    interior = (ndimage.maximum_filter(labels, 3) == ndimage.minimum_filter(labels, 3)).astype(np.float32)
    ignored = (labels == IGNORE_ID).astype(np.float32)
    cfg = AugmentConfig(p_rotation=1, p_scale=1, p_elastic=1, p_mirror=0.5, elastic_magnitude_mm=8.0)
    rng = np.random.default_rng(11)
    draws = [draw_sample(rng, cfg, SPACING, PATCH) for _ in range(4)]
    origins = [(12, 5, 55), (14, 10, 60), (10, 8, 50), (16, 12, 58)]  # around the ignored blob
    image, lab = warped(labels, [ignored, interior], draws, origins)
    sure = image[:, 1] > 0.999
    assert (lab == IGNORE_ID).any() and sure.float().mean() > 0.3
    assert torch.equal(image[:, 0][sure].round().bool(), lab[:, 0][sure] == IGNORE_ID)
    assert set(torch.unique(lab).tolist()) <= {0, 1, 2, 4, IGNORE_ID}  # nearest: no value in between
