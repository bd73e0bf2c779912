"""From blended network-resolution logits to labels on the (cropped) input grid.

Faithful mode follows nnU-Net: logits resampled with order 1 in-plane and order 0 along the
low-resolution axis, then argmax. It streams: each block of network rows is resampled and reduced
to labels at once, so neither the full-resolution logits nor probabilities need to exist (unless
probabilities are asked for). Fast mode gets the same labels at the cost of a label upsampling: it
interpolates the logits only where the network-resolution argmax changes (:func:`refine_plane`).
"""
from __future__ import annotations

import itertools
from typing import Iterable

import numpy as np

from .kernels import native_enabled
from .resample import ResamplePlan, each_source_row, linear_weights, resample, resize_skimage, z_source_index
from .xp import array_module, to_device


def softmax(logits, axis: int = 0):
    xp = array_module(logits)
    e = xp.exp(logits - logits.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def streams(plan: ResamplePlan) -> bool:
    """Whether the back-resampling of ``plan`` is a z selection followed by in-plane resizing."""
    return plan.separate_axis == 0 and (plan.order_z == 0 or plan.in_shape[0] == plan.out_shape[0])


def labels_faithful(blocks: Iterable, plan: ResamplePlan, num_classes: int, want_probabilities: bool = False,
                    compute_dtype=np.float32, out=None, on_plane=None, threads: int | None = None):
    """Consume ``(z0, z1, logits_block)`` in row order; return uint8 labels of ``plan.out_shape``
    (written into ``out`` if given) and float16 probabilities if asked. ``on_plane(row, logits)``, if given,
    sees the resampled (K, Y, X) logits of every output row (e.g. :class:`flare_rt.confidence.ConfidenceRows`);
    it must only write that row, for the source rows of a block are resampled on ``threads`` CPU threads
    (:func:`flare_rt.resample.each_source_row`; one loop on a GPU). A source row shared by consecutive output rows
    is resampled once."""
    out_shape = plan.out_shape
    if not streams(plan):  # rare (isotropic or x/y-anisotropic models): resample per class, running argmax
        labels, probs = _labels_per_class(blocks, plan, num_classes, want_probabilities, compute_dtype, on_plane)
        if out is not None:
            out[...] = labels
            labels = out
        return labels, probs
    blocks = iter(blocks)
    first = next(blocks, None)
    if first is None:
        return out, None
    xp = array_module(first[2])
    labels = out if out is not None else xp.zeros(out_shape, dtype=np.uint8)
    probs = xp.zeros((num_classes, *out_shape), dtype=np.float16) if want_probabilities else None
    idx = z_source_index(plan.in_shape[0], out_shape[0])
    for z0, z1, blk in itertools.chain([first], blocks):
        def one(s, ks, blk=blk, z0=z0):
            plane = blk[:, s - z0]
            planes = xp.stack([resize_skimage(plane[c].astype(compute_dtype, copy=False), out_shape[1:],
                                              plan.order, np.float32) for c in range(num_classes)])
            argmax = planes.argmax(0)
            p = softmax(planes).astype(np.float16) if want_probabilities else None
            for k in ks:
                labels[k] = argmax
                if on_plane is not None:
                    on_plane(k, planes)
                if p is not None:
                    probs[:, k] = p

        each_source_row(idx, z0, z1, one, threads, xp)
    return labels, probs


def _labels_per_class(blocks: Iterable, plan: ResamplePlan, num_classes: int, want_probabilities: bool,
                      compute_dtype, on_plane=None):
    full = None
    for z0, z1, blk in blocks:
        xp = array_module(blk)
        if full is None:
            full = xp.empty((num_classes, *plan.in_shape), dtype=xp.float32)
        full[:, z0:z1] = blk
    xp = array_module(full)
    best = best_idx = probs = None
    keep = want_probabilities or on_plane is not None
    for c in range(num_classes):
        r = resample(full[c:c + 1], plan, out_dtype=np.float32, compute_dtype=compute_dtype)[0]
        if keep:
            if probs is None:
                probs = xp.empty((num_classes, *plan.out_shape), dtype=np.float32)
            probs[c] = r
        if best is None:
            best, best_idx = r, xp.zeros(plan.out_shape, dtype=np.uint8)
        else:
            better = r > best
            best = xp.where(better, r, best)
            best_idx[better] = c
    if on_plane is not None:
        for k in range(plan.out_shape[0]):
            on_plane(k, probs[:, k])
    probs = softmax(probs).astype(np.float16) if want_probabilities else None
    return best_idx, probs


def plane_weights(in_plane, out_plane, xp=np):
    """The bilinear sample positions and weights of :func:`refine_plane` (y0, y1, wy, x0, x1, wx), as
    arrays of ``xp`` (compute once per case, not per plane: on a GPU they are an upload)."""
    (y0, y1, wy), (x0, x1, wx) = (linear_weights(n, m, np.float32) for n, m in zip(in_plane, out_plane))
    return tuple(to_device(a, xp) for a in (y0, y1, wy, x0, x1, wx))


def refine_plane(logits, out_plane, weights=None):
    """Labels of the bilinearly resized (K, Y, X) ``logits`` on ``out_plane``, computed exactly but
    only where needed: where the four network voxels around a sample share one argmax, the
    interpolated logits (a convex combination) have that argmax too; elsewhere (label boundaries,
    typically a few per cent of voxels) the K logits are interpolated and reduced."""
    xp = array_module(logits)
    net = logits.argmax(0)
    y0, y1, wy, x0, x1, wx = weights or plane_weights(logits.shape[1:], out_plane, xp)
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


def labels_refined(blocks: Iterable, plan: ResamplePlan, out=None, threads: int | None = None):
    """Fast mode's labels for nnU-Net's usual back-resampling (in-plane order 1, z order 0): the
    argmax of the resampled logits, as :func:`labels_faithful`, at the cost of a label upsampling
    (written into ``out`` if given). The rows of a block are refined on ``threads`` CPU threads
    (:func:`flare_rt.resample.each_source_row`; one loop on a GPU)."""
    if not refinable(plan):
        raise ValueError(f"boundary-refined upsampling needs in-plane order 1 and z order 0, got {plan}")
    blocks = iter(blocks)
    first = next(blocks, None)
    if first is None:
        return out
    blocks = itertools.chain([first], blocks)
    if native_enabled(array_module(first[2])):
        return _labels_native(blocks, plan, out)
    xp = array_module(first[2])
    idx = z_source_index(plan.in_shape[0], plan.out_shape[0])
    weights = plane_weights(plan.in_shape[1:], plan.out_shape[1:], xp)
    labels = out if out is not None else xp.zeros(plan.out_shape, dtype=np.uint8)
    for z0, z1, blk in blocks:
        def one(s, ks, blk=blk, z0=z0):
            plane = refine_plane(blk[:, s - z0], plan.out_shape[1:], weights)
            for k in ks:
                labels[k] = plane

        each_source_row(idx, z0, z1, one, threads, xp)
    return labels


def _labels_native(blocks: Iterable, plan: ResamplePlan, out=None):
    """:func:`labels_refined` with the native kernel: one launch per block, the same labels."""
    from .kernels import labels_from_logits

    idx = z_source_index(plan.in_shape[0], plan.out_shape[0])
    labels = out
    for z0, z1, blk in blocks:
        if labels is None:
            labels = array_module(blk).zeros(plan.out_shape, dtype=np.uint8)
        t = np.flatnonzero((idx >= z0) & (idx < z1))  # consecutive: idx never decreases
        if t.size:
            labels[t[0]:t[-1] + 1] = labels_from_logits(blk, idx[t] - z0, plan.out_shape[1:])
    return labels


def refinable(plan: ResamplePlan) -> bool:
    """Whether :func:`labels_refined` applies (nnU-Net's usual back-resampling: z order 0, in-plane order 1)."""
    return plan.separate_axis == 0 and plan.order == 1 and plan.order_z == 0
