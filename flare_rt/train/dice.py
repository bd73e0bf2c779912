"""Online validation: per-class true/false positives and false negatives of argmax predictions, counted
only in the patches that annotate the class, and the Dice they give."""
from __future__ import annotations

import math

import torch

from ..labels import IGNORE_ID


def confusion(pred: torch.Tensor, target: torch.Tensor, annotated: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(3, C) float64 counts [tp, fp, fn] of labels ``pred`` vs ``target`` (B, ...) in annotated patches;
    voxels whose target is ``IGNORE_ID`` are not counted."""
    b = pred.shape[0]
    target = target.reshape(b, -1).long()
    valid = (target != IGNORE_ID)[..., None]
    p = torch.nn.functional.one_hot(pred.reshape(b, -1).long(), num_classes).bool() & valid
    t = torch.nn.functional.one_hot(torch.where(valid[..., 0], target, 0), num_classes).bool() & valid
    tp = (p & t).sum(1)
    fp = (p & ~t).sum(1)
    fn = (~p & t).sum(1)
    w = annotated.to(tp.device).bool()
    return torch.stack([(x * w).sum(0) for x in (tp, fp, fn)]).double()


def dice_from_counts(counts: torch.Tensor) -> list[float]:
    """Per class ``2 tp / (2 tp + fp + fn)``; NaN where the class was never seen nor predicted."""
    tp, fp, fn = counts.tolist()
    return [2 * a / (2 * a + b + c) if (2 * a + b + c) > 0 else math.nan for a, b, c in zip(tp, fp, fn)]
