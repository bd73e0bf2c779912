"""Python entry points of the native kernels: argument checks (typed errors), launch on CuPy's
current stream. Each replaces a library sequence of the GPU pipeline and gives its result bit for
bit (see README.md beside this file)."""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from ..errors import FlareError
from ..resample import linear_weights
from ..xp import array_module
from .loader import load_kernels

#: One launch handles at most this many tiles (the kernel's 64-bit coverage mask).
MAX_TILES_PER_LAUNCH = 64
_MAX_GRID_Z = 65535
_BLOCK = (32, 8, 1)
#: A null device pointer, passed by value as 8 zero bytes (how CuPy passes None differs by version).
_NULL = np.uint64(0)


class KernelArgumentError(FlareError, ValueError):
    """An array passed to a native kernel has the wrong module, dtype, shape or layout."""


def _cupy_of(name: str, a):
    xp = array_module(a)
    if xp is np:
        raise KernelArgumentError(f"{name} must be a CuPy array (the native kernels run on the GPU), got "
                                  f"{type(a).__module__}.{type(a).__name__}; on the CPU use the numpy path")
    return xp


def _check(name: str, a, dtypes, ndim: int | None = None, shape=None, contiguous: bool = True):
    if a.dtype not in dtypes:
        raise KernelArgumentError(f"{name} must be {' or '.join(str(np.dtype(d)) for d in dtypes)}, got {a.dtype}")
    if ndim is not None and a.ndim != ndim:
        raise KernelArgumentError(f"{name} must have {ndim} dimensions, got shape {tuple(a.shape)}")
    if shape is not None and tuple(a.shape) != tuple(shape):
        raise KernelArgumentError(f"{name} must have shape {tuple(shape)}, got {tuple(a.shape)}")
    if contiguous and not a.flags.c_contiguous:
        raise KernelArgumentError(f"{name} must be C-contiguous (got strides {a.strides}); pass "
                                  f"xp.ascontiguousarray({name}) or write into a contiguous buffer")


def _element_strides(name: str, a) -> tuple[int, ...]:
    if any(s % a.itemsize for s in a.strides):
        raise KernelArgumentError(f"{name} has strides {a.strides} that are not multiples of its item size")
    return tuple(s // a.itemsize for s in a.strides)


def _same_device(cp, *arrays) -> None:
    dev = cp.cuda.Device().id
    for name, a in arrays:
        if a is not None and a.device.id != dev:
            raise KernelArgumentError(f"{name} lives on GPU {a.device.id}, but the current device is GPU {dev}; "
                                      f"use `with cupy.cuda.Device({a.device.id}):`")


@lru_cache(maxsize=16)
def _axis_table(cp, device: int, n_in: int, n_out: int):
    """refine_plane's sample table along one axis (resample.linear_weights: lower and upper index as
    int32, float32 weight) on the GPU, uploaded once per geometry and device."""
    lo, hi, w = linear_weights(n_in, n_out, np.float32)
    return cp.asarray(lo.astype(np.int32)), cp.asarray(hi.astype(np.int32)), cp.asarray(w)


def labels_from_logits(logits, src, out_plane, *, weights=None, empty_background: bool = False, out=None):
    """uint8 labels (n, Yo, Xo) of output slices resampled from a block of logits, with no (K, Yo, Xo)
    temporary: ``out[i] = refine_plane(values[:, src[i]], out_plane)`` bit for bit.

    - ``logits``: (K, nz, Yn, Xn) float32 or float16 CuPy array, any strides (e.g. the un-padding view
      of the blend buffer); K <= 256.
    - ``src``: (n,) host integers in [0, nz): the block slice each output slice takes (z order 0).
    - ``out_plane``: (Yo, Xo).
    - ``weights``: optional (nz, Yn, Xn) float32 blend weight sum, any strides. The values are then the
      blended logits as ``window.sliding_window_blocks`` emits them, where(w > 0, logits / max(w, 1e-30), 0),
      with class 0 set to 1 where w == 0 if ``empty_background`` (fast mode's skipped tiles), so the
      normalised (K, nz, Yn, Xn) block never exists.
    - ``out``: optional C-contiguous uint8 (n, Yo, Xo) CuPy array to write into (e.g. ``labels[k0:k1]``).
    """
    cp = _cupy_of("logits", logits)
    _check("logits", logits, (np.float32, np.float16), ndim=4, contiguous=False)
    k, nz, yn, xn = (int(s) for s in logits.shape)
    if not 1 <= k <= 256:
        raise KernelArgumentError(f"logits must have 1 to 256 classes (uint8 labels), got {k}")
    src = np.asarray(src)
    if src.ndim == 1 and src.size == 0:
        src = src.astype(np.int32)  # [] has dtype float64
    if src.ndim != 1 or not np.issubdtype(src.dtype, np.integer):
        raise KernelArgumentError(f"src must be a 1-D integer host array, got {src.dtype} of shape {src.shape}")
    if src.size and (src.min() < 0 or src.max() >= nz):
        raise KernelArgumentError(f"src must index the block's {nz} slices, got values {src.min()}..{src.max()}")
    if len(out_plane) != 2 or min(int(s) for s in out_plane) < 1:
        raise KernelArgumentError(f"out_plane must be two positive sizes (Yo, Xo), got {tuple(out_plane)}")
    yo, xo = (int(s) for s in out_plane)
    n = int(src.size)
    if weights is not None:
        _cupy_of("weights", weights)
        _check("weights", weights, (np.float32,), shape=(nz, yn, xn), contiguous=False)
    if out is None:
        out = cp.empty((n, yo, xo), dtype=cp.uint8)
    else:
        _cupy_of("out", out)
        _check("out", out, (np.uint8,), shape=(n, yo, xo))
    _same_device(cp, ("logits", logits), ("weights", weights), ("out", out))
    if n == 0:
        return out
    dev = cp.cuda.Device().id
    ylo, yhi, wy = _axis_table(cp, dev, yn, yo)
    xlo, xhi, wx = _axis_table(cp, dev, xn, xo)
    sk, sz, sy, sx = _element_strides("logits", logits)
    wsz, wsy, wsx = _element_strides("weights", weights) if weights is not None else (0, 0, 0)
    fn = load_kernels(cp)["labels_from_logits_f16" if logits.dtype == np.float16 else "labels_from_logits_f32"]
    w_arg = weights if weights is not None else _NULL
    src_dev = cp.asarray(src.astype(np.int32))
    i64, i32 = np.int64, np.int32
    for start in range(0, n, _MAX_GRID_Z):
        m = min(n - start, _MAX_GRID_Z)
        grid = ((xo + _BLOCK[0] - 1) // _BLOCK[0], (yo + _BLOCK[1] - 1) // _BLOCK[1], m)
        fn(grid, _BLOCK, (logits, i32(k), i64(sk), i64(sz), i64(sy), i64(sx),
                          w_arg, i64(wsz), i64(wsy), i64(wsx), i32(bool(empty_background)),
                          src_dev[start:start + m], i32(m),
                          ylo, yhi, wy, i32(yo), xlo, xhi, wx, i32(xo), out[start:start + m]))
    return out


def accumulate_tiles(acc, wsum, pred, gauss, origins) -> None:
    """Add a batch of tile predictions, weighted by the Gaussian map, into the blend buffer, and the
    map into the weight sum, in place: for each tile b in order, ``acc[:, tile_b] += pred[b] * gauss``
    and ``wsum[tile_b] += gauss``, bit-identical to that sequential loop in float32 (fp16 predictions
    are widened exactly first) in one launch per 64 tiles.

    - ``acc``: (K, D, Y, X) float32, ``wsum``: (D, Y, X) float32, both C-contiguous CuPy arrays.
    - ``pred``: (B, K, pz, py, px) float32 or float16, C-contiguous; ``gauss``: (pz, py, px) float32.
    - ``origins``: (B, 3) host integers: each tile's first voxel in (D, Y, X) of the buffer.
    """
    cp = _cupy_of("acc", acc)
    _check("acc", acc, (np.float32,), ndim=4)
    k, d, y, x = (int(s) for s in acc.shape)
    for name, a in (("wsum", wsum), ("pred", pred), ("gauss", gauss)):
        _cupy_of(name, a)
    _check("wsum", wsum, (np.float32,), shape=(d, y, x))
    _check("pred", pred, (np.float32, np.float16), ndim=5)
    b = int(pred.shape[0])
    if int(pred.shape[1]) != k:
        raise KernelArgumentError(f"pred has {pred.shape[1]} classes but acc has {k}")
    patch = tuple(int(s) for s in pred.shape[2:])
    _check("gauss", gauss, (np.float32,), shape=patch)
    org = np.asarray(origins)
    if org.shape != (b, 3) or not np.issubdtype(org.dtype, np.integer):
        raise KernelArgumentError(f"origins must be ({b}, 3) host integers (one per tile), got {org.dtype} "
                                  f"of shape {org.shape}")
    if b and ((org < 0).any() or (org + np.array(patch) > np.array((d, y, x))).any()):
        bad = org[((org < 0) | (org + np.array(patch) > np.array((d, y, x)))).any(axis=1)][0]
        raise KernelArgumentError(f"tile origin {tuple(int(v) for v in bad)} with patch {patch} does not fit "
                                  f"the buffer's (D, Y, X) = {(d, y, x)}")
    _same_device(cp, ("acc", acc), ("wsum", wsum), ("pred", pred), ("gauss", gauss))
    if b == 0:
        return
    fn = load_kernels(cp)["accumulate_tiles_f16" if pred.dtype == np.float16 else "accumulate_tiles_f32"]
    i32 = np.int32
    for start in range(0, b, MAX_TILES_PER_LAUNCH):
        chunk = org[start:start + MAX_TILES_PER_LAUNCH]
        lo, hi = chunk.min(axis=0), chunk.max(axis=0) + np.array(patch)
        nz, ny, nx = (int(v) for v in hi - lo)
        grid = ((nx + _BLOCK[0] - 1) // _BLOCK[0], (ny + _BLOCK[1] - 1) // _BLOCK[1], nz)
        fn(grid, _BLOCK, (acc, wsum, i32(k), i32(d), i32(y), i32(x),
                          pred[start:start + len(chunk)], gauss, *(i32(p) for p in patch),
                          cp.asarray(chunk.astype(np.int32)), i32(len(chunk)),
                          i32(lo[0]), i32(lo[1]), i32(lo[2]), i32(ny), i32(nx)))
