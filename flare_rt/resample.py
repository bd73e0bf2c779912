"""nnU-Net v2's resampling (``resample_data_or_seg_to_shape``) as array-module-generic functions.

In-plane (or 3D) resizing reproduces ``skimage.transform.resize(order, mode='edge',
anti_aliasing=False)``: ``ndimage.zoom(grid_mode=True, mode='nearest')`` clipped to the input's range
(order-1 float32 planes on the CPU, faithful mode's way back, separably: :func:`linear_plane`).
Along a low-resolution axis (spacing anisotropy > 3) nnU-Net resizes slice by slice and then
interpolates along z with ``order_z``; with ``order_z == 0`` that is a pure slice selection, so we
select first and resize only the slices that are kept (identical result, fewer slices).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .bundle import ResamplingRule
from .threads import run_split
from .xp import array_module, ndimage_module, to_device


@dataclass(frozen=True)
class ResamplePlan:
    """How to go from ``in_shape`` to ``out_shape`` (3D, network axis order)."""

    in_shape: tuple[int, int, int]
    out_shape: tuple[int, int, int]
    separate_axis: int | None  # low-resolution axis resampled separately, or None for 3D resizing
    order: int
    order_z: int

    @property
    def identity(self) -> bool:
        return self.in_shape == self.out_shape


def separate_z_axis(current_spacing, new_spacing, rule: ResamplingRule) -> int | None:
    """nnU-Net's ``determine_do_sep_z_and_axis``."""
    def lowres_axes(sp):
        sp = np.asarray(sp, dtype=float)
        return np.where(max(sp) / sp == 1)[0]

    def aniso(sp):
        return (np.max(sp) / np.min(sp)) > rule.anisotropy_threshold

    if rule.force_separate_z is not None:
        axes = lowres_axes(current_spacing) if rule.force_separate_z else None
    elif aniso(current_spacing):
        axes = lowres_axes(current_spacing)
    elif aniso(new_spacing):
        axes = lowres_axes(new_spacing)
    else:
        axes = None
    if axes is None or len(axes) != 1:
        return None
    return int(axes[0])


def make_plan(in_shape, out_shape, current_spacing, new_spacing, rule: ResamplingRule, probabilities: bool) -> ResamplePlan:
    order, order_z = (rule.prob_order, rule.prob_order_z) if probabilities else (rule.data_order, rule.data_order_z)
    return ResamplePlan(tuple(int(s) for s in in_shape), tuple(int(s) for s in out_shape),
                        separate_z_axis(current_spacing, new_spacing, rule), order, order_z)


def resize_skimage(x, out_shape, order: int, out_dtype=None):
    """``skimage.transform.resize(x, out_shape, order, mode='edge', anti_aliasing=False)`` on numpy or CuPy."""
    xp = array_module(x)
    ndi = ndimage_module(xp)
    out_shape = tuple(int(s) for s in out_shape)
    if tuple(x.shape) == out_shape:
        return x.astype(out_dtype or x.dtype, copy=False)
    if order == 1 and x.ndim == 2 and xp is np and x.dtype == np.float32:
        # faithful mode's way back, one plane per class and row; float64 stays SciPy's, bit for bit
        out = linear_plane(x, out_shape)
        np.clip(out, x.min(), x.max(), out=out)
        return out.astype(out_dtype or x.dtype, copy=False)
    factors = np.divide(x.shape, out_shape)
    zoom = [1 / f for f in factors]
    if order == 0:
        out = ndi.zoom(x, zoom, order=0, mode="nearest", grid_mode=True)
    else:
        out = ndi.zoom(x, zoom, order=order, mode="nearest", grid_mode=True)
        xp.clip(out, x.min(), x.max(), out=out)
    return out.astype(out_dtype or x.dtype, copy=False)


def z_source_index(n_in: int, n_out: int, xp=np):
    """Nearest source slice of each output slice as nnU-Net's map_coordinates(order=0, mode='nearest'):
    coordinate = scale * (k + 0.5) - 0.5, rounded half up, clamped."""
    scale = float(n_in) / n_out
    coord = scale * (np.arange(n_out, dtype=np.float64) + 0.5) - 0.5
    idx = np.clip(np.floor(coord + 0.5), 0, n_in - 1).astype(np.int64)
    return to_device(idx, xp)


def each_source_row(idx: np.ndarray, z0: int, z1: int, fn, threads: int | None = None, xp=np) -> None:
    """``fn(s, ks)`` for every source row ``s`` in [z0, z1) of a z selection ``idx`` (each computed once)
    with ``ks``, the output rows taken from it, in order; the source rows go to ``threads`` CPU threads
    (:func:`flare_rt.threads.run_split`; one loop on a GPU), so ``fn`` must write only rows ``ks``."""
    rows: dict[int, list[int]] = {}
    for k in np.flatnonzero((idx >= z0) & (idx < z1)).tolist():
        rows.setdefault(int(idx[k]), []).append(k)
    run_split(lambda s: fn(s, rows[s]), list(rows), threads, xp)


def linear_weights(n_in: int, n_out: int, dtype=np.float64):
    """Linear interpolation along one axis with pixel-centre alignment, clamped at the edges (ndimage
    ``zoom(order=1, grid_mode=True, mode='nearest')``, nnU-Net's order-1 z interpolation): for each
    output index the lower and upper source index and the upper weight."""
    scale = float(n_in) / n_out
    coord = np.clip(scale * (np.arange(n_out, dtype=np.float64) + 0.5) - 0.5, 0, n_in - 1)
    lo = np.floor(coord).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    return lo, hi, (coord - lo).astype(dtype)


def linear_plane(x: np.ndarray, out_shape) -> np.ndarray:
    """``ndimage.zoom(x, order=1, mode='nearest', grid_mode=True)`` of a 2D array, computed separably (rows,
    then columns) in float64 as SciPy interpolates, returned in ``x``'s dtype: the same values (float32: equal
    but for a float64 rounding that lands on a float32 rounding boundary) in ~60 % of the time of SciPy's
    general spline code."""
    (y0, y1, wy), (x0, x1, wx) = (linear_weights(n, m) for n, m in zip(x.shape, out_shape))
    rows = x[y0] * (1 - wy)[:, None] + x[y1] * wy[:, None]  # float64 (array promotion)
    return (rows[:, x0] * (1 - wx) + rows[:, x1] * wx).astype(x.dtype, copy=False)


def _move(x, axis: int):
    """View with ``axis`` (of the last three) moved to the front of the spatial axes."""
    xp = array_module(x)
    return xp.moveaxis(x, x.ndim - 3 + axis, x.ndim - 3)


def resample(data, plan: ResamplePlan, out_dtype=None, compute_dtype=np.float64, pre=None,
             threads: int | None = None):
    """Resample (C, Z, Y, X) ``data`` to ``plan.out_shape`` exactly as nnU-Net's resample_data_or_seg
    (``compute_dtype`` float64 as nnU-Net; float32 is the fast path).

    ``pre`` (e.g. CT normalisation) is applied to the input before resampling, slice by slice where the
    plan resamples slices (the same values as applying it to the whole volume first, without a
    full-size float copy of the input). Slices selected along z are resized on ``threads`` CPU threads
    (:func:`each_source_row`; one loop on a GPU)."""
    xp = array_module(data)
    pre = pre or (lambda a: a)
    out_dtype = out_dtype or data.dtype
    if plan.identity:
        return pre(data).astype(out_dtype, copy=False)
    c = data.shape[0]
    out = xp.empty((c, *plan.out_shape), dtype=out_dtype)
    if plan.separate_axis is None:
        for ch in range(c):
            out[ch] = resize_skimage(pre(data[ch]).astype(compute_dtype, copy=False), plan.out_shape, plan.order,
                                     out_dtype)
        return out
    ax = plan.separate_axis
    n_in, n_out = plan.in_shape[ax], plan.out_shape[ax]
    plane = tuple(s for i, s in enumerate(plan.out_shape) if i != ax)
    src = _move(data, ax)
    dst = _move(out, ax)
    for ch in range(c):
        if plan.order_z == 0 or n_in == n_out:
            def one(s, ks, ch=ch):
                resized = resize_skimage(pre(src[ch, s]).astype(compute_dtype, copy=False), plane, plan.order,
                                         out_dtype)
                for k in ks:
                    dst[ch, k] = resized

            each_source_row(z_source_index(n_in, n_out), 0, n_in, one, threads, xp)
        else:
            planes = xp.stack([resize_skimage(pre(src[ch, s]).astype(compute_dtype, copy=False), plane, plan.order,
                                              compute_dtype) for s in range(n_in)])
            lo, hi, w = (to_device(a, xp) for a in linear_weights(n_in, n_out))
            w = w.reshape(-1, 1, 1)
            dst[ch] = ((1 - w) * planes[lo] + w * planes[hi]).astype(out_dtype)
    return out


def upsample_labels_nearest(labels, out_shape):
    """Nearest-neighbour resampling with pixel-centre alignment (labels, masks, or an image sampled for a
    mask), by index gathering."""
    xp = array_module(labels)
    idx = [z_source_index(n_in, n_out, xp) for n_in, n_out in zip(labels.shape, out_shape)]
    return labels[idx[0]][:, idx[1]][:, :, idx[2]]
