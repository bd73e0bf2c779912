"""From blended network-resolution logits to labels on the (cropped) input grid.

Faithful mode follows nnU-Net: logits resampled with order 1 in-plane and order 0 along the
low-resolution axis, then argmax. It streams: each block of network rows is resampled and reduced
to labels at once, so neither the full-resolution logits nor probabilities need to exist (unless
probabilities are asked for). Fast mode takes the argmax at network resolution and upsamples the
labels by nearest neighbour.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

from .resample import ResamplePlan, resample, resize_skimage, upsample_labels_nearest, z_source_index
from .xp import array_module


def softmax(logits, axis: int = 0):
    xp = array_module(logits)
    e = xp.exp(logits - logits.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _argmax_labels(planes):
    return planes.argmax(0).astype(np.uint8)


def labels_faithful(blocks: Iterable, plan: ResamplePlan, num_classes: int, want_probabilities: bool = False,
                    compute_dtype=np.float32):
    """Consume ``(z0, z1, logits_block)`` in row order; return uint8 labels of ``plan.out_shape``
    (and float16 probabilities if asked)."""
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
        for c in range(num_classes):
            r = resample(full[c:c + 1], plan, out_dtype=np.float32, compute_dtype=compute_dtype)[0]
            if probs is None and want_probabilities:
                probs = xp.empty((num_classes, *out_shape), dtype=np.float32)
            if want_probabilities:
                probs[c] = r
            if best is None:
                best, best_idx = r, xp.zeros(out_shape, dtype=np.uint8)
            else:
                better = r > best
                best = xp.where(better, r, best)
                best_idx[better] = c
        if want_probabilities:
            probs = softmax(probs).astype(np.float16)
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
            if want_probabilities:
                probs[:, k] = softmax(last).astype(np.float16)
    return labels, probs


def labels_fast(blocks: Iterable, net_shape, out_shape, want_probabilities: bool = False):
    """Argmax at network resolution, nearest-neighbour upsampling of the labels."""
    net_labels = None
    net_probs = None
    for z0, z1, blk in blocks:
        xp = array_module(blk)
        if net_labels is None:
            net_labels = xp.zeros(tuple(net_shape), dtype=np.uint8)
            if want_probabilities:
                net_probs = xp.zeros((blk.shape[0], *net_shape), dtype=np.float16)
        net_labels[z0:z1] = _argmax_labels(blk)
        if want_probabilities:
            net_probs[:, z0:z1] = softmax(blk).astype(np.float16)
    labels = upsample_labels_nearest(net_labels, out_shape)
    probs = None
    if want_probabilities:
        xp = array_module(net_probs)
        probs = xp.stack([upsample_labels_nearest(p, out_shape) for p in net_probs])
    return labels, probs
