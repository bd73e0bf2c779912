"""Dice + cross-entropy with deep supervision, with the marginal (merged-background) form for partial labels.

A case that does not annotate class ``k`` cannot say whether a voxel is ``k`` or background; the marginal
loss therefore scores the network's probability of "background or any unannotated class": for each
patch the probabilities of its unannotated classes are summed into background (CE) and those classes
are left out of the Dice. Moving probability between background and an unannotated class leaves the
loss unchanged, so nothing teaches the network that ``k`` is background. For a fully annotated patch
the marginal loss is the plain loss exactly. Voxels labelled ``IGNORE_ID`` (e.g. low-confidence
pseudo-labels) count in neither term.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..labels import IGNORE_ID
from .config import LossConfig


def merged_log_probs(logits: torch.Tensor, annotated: torch.Tensor | None) -> torch.Tensor:
    """log-softmax of ``logits`` (B, C, ...) where, per patch, background holds the log of the summed
    probability of background and the unannotated classes, and unannotated classes are -inf.

    ``annotated`` (B, C) bool (background always counted annotated); None: all annotated (plain loss)."""
    wide = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()  # AMP: fp16 -> fp32
    logp = torch.log_softmax(wide, dim=1)
    if annotated is None or bool(annotated.all()):
        return logp
    view = (*annotated.shape, *([1] * (logits.ndim - 2)))
    ann = annotated.clone()
    ann[:, 0] = True
    group = ~ann
    group[:, 0] = True  # background + unannotated classes
    neg_inf = torch.tensor(float("-inf"), device=logp.device, dtype=logp.dtype)
    bg = torch.logsumexp(torch.where(group.view(view), logp, neg_inf), dim=1, keepdim=True)
    out = torch.where(ann.view(view), logp, neg_inf)
    return torch.cat([bg, out[:, 1:]], dim=1)


def soft_dice(probs: torch.Tensor, onehot: torch.Tensor, annotated: torch.Tensor, batch_dice: bool,
              smooth: float) -> torch.Tensor:
    """nnU-Net's memory-efficient soft Dice over the foreground classes (background left out), averaged
    over the (patch, class) pairs that are annotated; returns -Dice as nnU-Net does."""
    axes = tuple(range(2, probs.ndim))
    inter = (probs * onehot).sum(axes)
    pred = probs.sum(axes)
    gt = onehot.sum(axes)
    w = annotated.to(probs.dtype)
    inter, pred, gt, w = inter[:, 1:], pred[:, 1:], gt[:, 1:], w[:, 1:]
    if batch_dice:
        inter, pred, gt = (inter * w).sum(0), (pred * w).sum(0), (gt * w).sum(0)
        w = (w.sum(0) > 0).to(probs.dtype)
    dc = (2 * inter + smooth) / (gt + pred + smooth).clamp(min=1e-8)
    return -(dc * w).sum() / w.sum().clamp(min=1)


def dice_ce(logits: torch.Tensor, target: torch.Tensor, annotated: torch.Tensor | None, cfg: LossConfig) -> torch.Tensor:
    """Dice + CE of one output. ``target`` (B, 1, ...) or (B, ...) integer labels; voxels labelled
    ``IGNORE_ID`` are left out of both terms (no loss, no gradient)."""
    if target.ndim == logits.ndim:
        target = target[:, 0]
    target = target.long()
    b, c = logits.shape[:2]
    ann = torch.ones(b, c, dtype=torch.bool, device=logits.device) if annotated is None else annotated.bool()
    logp = merged_log_probs(logits, ann)
    valid = target != IGNORE_ID
    if bool(valid.all()):
        ce = F.nll_loss(logp, target)
        onehot = torch.zeros_like(logp).scatter_(1, target[:, None], 1.0)
        probs = logp.exp()
    else:
        target = torch.where(valid, target, 0)
        nll = torch.where(valid, -logp.gather(1, target[:, None])[:, 0], 0.0)
        ce = nll.sum() / valid.sum().clamp(min=1)
        keep = valid[:, None].to(logp.dtype)
        onehot = torch.zeros_like(logp).scatter_(1, target[:, None], 1.0) * keep
        probs = logp.exp() * keep
    dice = soft_dice(probs, onehot, ann, cfg.batch_dice, cfg.smooth)
    return cfg.ce_weight * ce + cfg.dice_weight * dice


def deep_supervision_weights(n: int) -> list[float]:
    """nnU-Net's: 1/2^i, the coarsest output at 0, normalised to sum 1."""
    w = [1 / 2**i for i in range(n)]
    if n > 1:
        w[-1] = 0.0
    total = sum(w)
    return [x / total for x in w]


def downsample_targets(labels: torch.Tensor, shapes: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """Labels (B, 1, ...) at each output's shape, nearest-exact (nnU-Net's DownsampleSegForDSTransform)."""
    out = []
    for shape in shapes:
        if tuple(labels.shape[2:]) == tuple(shape):
            out.append(labels)
        else:
            out.append(F.interpolate(labels.float(), size=tuple(shape), mode="nearest-exact").to(labels.dtype))
    return out


def segmentation_loss(outputs: torch.Tensor | Sequence[torch.Tensor], labels: torch.Tensor,
                      annotated: torch.Tensor | None, cfg: LossConfig) -> torch.Tensor:
    """The training loss: deep-supervised Dice + CE (marginal if ``cfg.marginal``) over all outputs.

    Every output contributes (with weight 0 for the coarsest), so every head gets a gradient (DDP needs it)."""
    outs = [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)
    ann = annotated if cfg.marginal else None
    targets = downsample_targets(labels, [o.shape[2:] for o in outs])
    weights = deep_supervision_weights(len(outs))
    return sum(w * dice_ce(o, t, ann, cfg) for w, o, t in zip(weights, outs, targets))  # type: ignore[return-value]
