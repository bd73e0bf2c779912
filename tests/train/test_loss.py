"""Dice + CE: the marginal loss ignores how probability is split between background and unannotated
classes, equals the plain loss on fully annotated patches, and deep supervision is weighted as nnU-Net."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from flare_rt.train.config import LossConfig
from flare_rt.train.loss import (deep_supervision_weights, dice_ce, downsample_targets, merged_log_probs,
                                 segmentation_loss, soft_dice)

C = 15
UNANNOTATED = 5  # aorta: not annotated by patch 0


def setup(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, C, 4, 6, 6, generator=g, dtype=torch.float64)
    annotated = torch.ones(2, C, dtype=torch.bool)
    annotated[0, [UNANNOTATED, 6, 9, 14]] = False
    allowed = [torch.nonzero(annotated[b]).flatten() for b in range(2)]
    target = torch.stack([a[torch.randint(len(a), (4, 6, 6), generator=g)] for a in allowed])[:, None]
    return logits, target, annotated


def move_mass(logits: torch.Tensor, b: int, k: int, share: torch.Tensor) -> torch.Tensor:
    """Redistribute, in patch ``b``, the summed probability of background and class ``k`` (share to bg)."""
    out = logits.clone()
    m = torch.logsumexp(torch.stack([logits[b, 0], logits[b, k]]), 0)
    out[b, 0], out[b, k] = m + torch.log(share), m + torch.log1p(-share)
    return out


@pytest.mark.parametrize("batch_dice", [True, False])
def test_marginal_loss_is_invariant_to_background_vs_unannotated_mass(batch_dice):
    logits, target, annotated = setup()
    cfg = LossConfig(batch_dice=batch_dice)
    share = torch.rand(logits.shape[2:], generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 0.98 + 0.01
    moved = move_mass(logits, 0, UNANNOTATED, share)
    base = dice_ce(logits, target, annotated, cfg)
    assert dice_ce(moved, target, annotated, cfg).item() == pytest.approx(base.item(), abs=1e-12)
    # the plain loss is not invariant: it teaches that the unannotated class is background
    plain = LossConfig(batch_dice=batch_dice, marginal=False)
    assert abs(segmentation_loss(moved, target, annotated, plain) - segmentation_loss(logits, target, annotated, plain)) > 1e-3


def test_marginal_gradient_does_not_push_unannotated_class_towards_background():
    logits, target, annotated = setup()
    x = logits.clone().requires_grad_(True)
    segmentation_loss(x, target, annotated, LossConfig()).backward()
    g, p = x.grad, torch.softmax(logits, 1)
    # direction that moves mass from class k to background and leaves every other probability alone:
    # d(logit_bg) = p_k, d(logit_k) = -p_bg. The loss's derivative along it is zero...
    along = g[0, 0] * p[0, UNANNOTATED] - g[0, UNANNOTATED] * p[0, 0]
    assert along.abs().max().item() < 1e-12
    # ...while it is not for an annotated class (patch 1 annotates everything) nor for the plain loss
    assert (g[1, 0] * p[1, UNANNOTATED] - g[1, UNANNOTATED] * p[1, 0]).abs().max().item() > 1e-6
    y = logits.clone().requires_grad_(True)
    segmentation_loss(y, target, annotated, LossConfig(marginal=False)).backward()
    assert (y.grad[0, 0] * p[0, UNANNOTATED] - y.grad[0, UNANNOTATED] * p[0, 0]).abs().max().item() > 1e-6


def test_marginal_equals_plain_when_everything_is_annotated():
    logits, target, _ = setup()
    target = torch.randint(0, C, target.shape, generator=torch.Generator().manual_seed(2))
    full = torch.ones(2, C, dtype=torch.bool)
    a = segmentation_loss(logits, target, full, LossConfig(marginal=True))
    b = segmentation_loss(logits, target, None, LossConfig(marginal=False))
    assert a.item() == b.item()
    assert torch.equal(merged_log_probs(logits, full), torch.log_softmax(logits, 1))


def test_merged_background_holds_the_summed_probability():
    logits, _, annotated = setup()
    merged = merged_log_probs(logits, annotated).exp()
    p = torch.softmax(logits, 1)
    unann = (~annotated[0]).nonzero().flatten()
    torch.testing.assert_close(merged[0, 0], p[0, 0] + p[0, unann].sum(0))
    assert (merged[0, unann] == 0).all()
    torch.testing.assert_close(merged.sum(1), torch.ones_like(merged[:, 0]))


def test_soft_dice_matches_hand_computation():
    probs = torch.zeros(1, 3, 1, 1, 4, dtype=torch.float64)
    probs[0, 1, 0, 0] = torch.tensor([1.0, 1.0, 0.5, 0.0])
    probs[0, 2, 0, 0] = torch.tensor([0.0, 0.0, 0.5, 1.0])
    probs[0, 0] = 1 - probs[0, 1] - probs[0, 2]
    onehot = torch.zeros_like(probs)
    onehot[0, 1, 0, 0, :2] = 1
    onehot[0, 2, 0, 0, 2:] = 1
    ann = torch.ones(1, 3, dtype=torch.bool)
    d1 = (2 * 2) / (2 + 2.5)
    d2 = (2 * 1.5) / (2 + 1.5)
    assert soft_dice(probs, onehot, ann, False, 0.0).item() == pytest.approx(-(d1 + d2) / 2)
    ann[0, 2] = False  # class 2 not annotated: left out of the mean
    assert soft_dice(probs, onehot, ann, True, 0.0).item() == pytest.approx(-d1)


def test_deep_supervision_weights_and_targets():
    assert deep_supervision_weights(1) == [1.0]
    w = deep_supervision_weights(4)
    np.testing.assert_allclose(w, np.array([1, 0.5, 0.25, 0]) / 1.75)
    labels = torch.zeros(1, 1, 4, 8, 8, dtype=torch.uint8)
    labels[..., 4:, :] = 3
    small = downsample_targets(labels, [(4, 8, 8), (4, 4, 4), (2, 2, 2)])
    assert small[0] is labels
    assert small[1].shape == (1, 1, 4, 4, 4) and small[1].dtype == torch.uint8
    assert (small[1][..., 2:, :] == 3).all() and (small[1][..., :2, :] == 0).all()
    assert small[2][0, 0, :, 1].eq(3).all() and small[2][0, 0, :, 0].eq(0).all()


def test_every_head_gets_a_gradient_with_deep_supervision():
    """The coarsest output has weight 0 but stays in the graph (DistributedDataParallel needs that)."""
    logits, target, annotated = setup()
    outs = [logits.clone().requires_grad_(True),
            torch.randn(2, C, 2, 3, 3, dtype=torch.float64, requires_grad=True)]
    segmentation_loss(outs, target, annotated, LossConfig()).backward()
    assert outs[0].grad.abs().sum() > 0
    assert outs[1].grad is not None and outs[1].grad.abs().sum() == 0
