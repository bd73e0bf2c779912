"""From blended network-resolution logits to labels on the (cropped) input grid.

Faithful mode follows nnU-Net: logits resampled with order 1 in-plane and order 0 along the
low-resolution axis, then argmax. It streams: each block of network rows is resampled and reduced
to labels at once, so neither the full-resolution logits nor probabilities need to exist (unless
probabilities are asked for). Fast mode gets the same labels at the cost of a label upsampling: it
interpolates the logits only where the network-resolution argmax changes (:func:`refine_plane`).
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

from .resample import ResamplePlan, resample, resize_skimage, z_source_index
from .xp import array_module


def softmax(logits, axis: int = 0):
    xp = array_module(logits)
    e = xp.exp(logits - logits.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _argmax_labels(planes):
    return planes.argmax(0).astype(np.uint8)


def labels_faithful(blocks: Iterable, plan: ResamplePlan, num_classes: int, want_probabilities: bool = False,
                    compute_dtype=np.float32, on_plane=None):
    """Consume ``(z0, z1, logits_block)`` in row order; return uint8 labels of ``plan.out_shape``
    (and float16 probabilities if asked). ``on_plane(row, logits)``, if given, sees the resampled
    (K, Y, X) logits of every output row (e.g. :class:`flare_rt.confidence.ConfidenceRows`)."""
    out_shape = plan.out_shape
    labels = None
    probs = None
    streaming = plan.separate_axis == 0 and (plan.order_z == 0 or plan.in_shape[0] == plan.out_shape[0])
    if not streaming:  # rare (isotropic or x/y-anisotropic models): resample per class, running argmax
        full = None
        for z0, z1, blk in blocks:
            xp = array_module(blk)
            if full is None:
                full = xp.empty((num_classes, *plan.in_shape), dtype=xp.float32)
            full[:, z0:z1] = blk
        xp = array_module(full)
        best = best_idx = None
        keep = want_probabilities or on_plane is not None
        for c in range(num_classes):
            r = resample(full[c:c + 1], plan, out_dtype=np.float32, compute_dtype=compute_dtype)[0]
            if probs is None and keep:
                probs = xp.empty((num_classes, *out_shape), dtype=np.float32)
            if keep:
                probs[c] = r
            if best is None:
                best, best_idx = r, xp.zeros(out_shape, dtype=np.uint8)
            else:
                better = r > best
                best = xp.where(better, r, best)
                best_idx[better] = c
        if on_plane is not None:
            for k in range(out_shape[0]):
                on_plane(k, probs[:, k])
        probs = softmax(probs).astype(np.float16) if want_probabilities else None
        return best_idx, probs
    idx = z_source_index(plan.in_shape[0], out_shape[0]) if plan.in_shape[0] != out_shape[0] \
        else np.arange(out_shape[0])
    plane = out_shape[1:]
    for z0, z1, blk in blocks:
        xp = array_module(blk)
        if labels is None:
            labels = xp.zeros(out_shape, dtype=np.uint8)
            if want_probabilities:
                probs = xp.zeros((num_classes, *out_shape), dtype=np.float16)
        targets = np.flatnonzero((idx >= z0) & (idx < z1))
        last_src, last = None, None
        for k in targets.tolist():
            s = int(idx[k])
            if s != last_src:
                planes = xp.stack([resize_skimage(blk[c, s - z0].astype(compute_dtype, copy=False), plane,
                                                  plan.order, np.float32) for c in range(num_classes)])
                last_src, last = s, planes
            labels[k] = _argmax_labels(last)
            if on_plane is not None:
                on_plane(k, last)
            if want_probabilities:
                probs[:, k] = softmax(last).astype(np.float16)
    return labels, probs


def _bilinear_axis(n_in: int, n_out: int):
    """ndimage.zoom(order=1, grid_mode=True, mode='nearest') sample positions along one axis."""
    c = np.clip((np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5, 0, n_in - 1)
    lo = np.floor(c).astype(np.int64)
    return lo, np.minimum(lo + 1, n_in - 1), (c - lo).astype(np.float32)


def refine_plane(logits, out_plane):
    """Labels of the bilinearly resized (K, Y, X) ``logits`` on ``out_plane``, computed exactly but
    only where needed: where the four network voxels around a sample share one argmax, the
    interpolated logits (a convex combination) have that argmax too; elsewhere (label boundaries,
    typically a few per cent of voxels) the K logits are interpolated and reduced."""
    xp = array_module(logits)
    net = logits.argmax(0)
    (y0, y1, wy), (x0, x1, wx) = (_bilinear_axis(n, m) for n, m in zip(logits.shape[1:], out_plane))
    if xp is not np:
        y0, y1, wy, x0, x1, wx = (xp.asarray(a) for a in (y0, y1, wy, x0, x1, wx))
    a, b = net[y0][:, x0], net[y0][:, x1]
    c, d = net[y1][:, x0], net[y1][:, x1]
    labels = a.astype(np.uint8)
    iy, ix = xp.nonzero((a != b) | (a != c) | (a != d))
    if iy.size:
        Y0, Y1, X0, X1 = y0[iy], y1[iy], x0[ix], x1[ix]
        WY, WX = wy[iy], wx[ix]
        top = (1 - WX) * logits[:, Y0, X0] + WX * logits[:, Y0, X1]
        bottom = (1 - WX) * logits[:, Y1, X0] + WX * logits[:, Y1, X1]
        labels[iy, ix] = ((1 - WY) * top + WY * bottom).argmax(0).astype(np.uint8)
    return labels


def labels_refined(blocks: Iterable, plan: ResamplePlan):
    """Fast mode's labels for nnU-Net's usual back-resampling (in-plane order 1, z order 0): the
    argmax of the resampled logits, as :func:`labels_faithful`, at the cost of a label upsampling."""
    if not (plan.separate_axis == 0 and plan.order == 1 and plan.order_z == 0):
        raise ValueError(f"boundary-refined upsampling needs in-plane order 1 and z order 0, got {plan}")
    out_shape = plan.out_shape
    idx = z_source_index(plan.in_shape[0], out_shape[0]) if plan.in_shape[0] != out_shape[0] \
        else np.arange(out_shape[0])
    labels = None
    for z0, z1, blk in blocks:
        xp = array_module(blk)
        if labels is None:
            labels = xp.zeros(out_shape, dtype=np.uint8)
        targets = np.flatnonzero((idx >= z0) & (idx < z1))
        last_src, last = None, None
        for k in targets.tolist():
            s = int(idx[k])
            if s != last_src:
                last_src, last = s, refine_plane(blk[:, s - z0], out_shape[1:])
            labels[k] = last
    return labels
