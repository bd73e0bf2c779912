"""Sliding-window inference: tile placement, Gaussian importance map and blending, as nnU-Net v2.

The network is any callable ``(B, C, *patch) array -> (B, K, *patch) array`` of the input's array
module (numpy or CuPy): the strategy knows nothing about backends. Blending streams: tiles are run
in order of their z start, and once no later tile can touch a block of rows, that block is
normalised and yielded, so the full (K, Z, Y, X) logits never need to exist at once.
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Iterator

import numpy as np

from .bundle import DEFAULT_TILE_STEP
from .errors import ConfigError
from .kernels import native_enabled
from .threads import class_slices, run_split
from .xp import array_module, to_device

log = logging.getLogger(__name__)

Network = Callable[[object], object]


@dataclass(frozen=True)
class WindowConfig:
    patch_size: tuple[int, int, int]
    step: float = DEFAULT_TILE_STEP
    batch_size: int = 1
    mirror_axes: tuple[int, ...] = ()  # TTA: all flip combinations over these spatial axes
    gaussian: bool = True
    threads: int | None = None  # CPU threads of the blend (numpy); None: flare_rt.threads.cpu_threads()
    # most rows per yielded block; None: each finished range at once (up to a patch depth). A block is
    # K x rows x Y x X float32 and its consumer still holds the previous one while the next is made, so a GPU
    # run takes a few rows (15 x 32 x 333 x 333 is 213 MiB); the values do not depend on it
    block_rows: int | None = None

    def __post_init__(self) -> None:
        if not 0 < self.step <= 1:
            raise ConfigError(f"tile step must be in (0, 1], got {self.step}; 0.5 is nnU-Net's default")
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {self.batch_size}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"blend threads must be >= 1, got {self.threads}")
        if self.block_rows is not None and self.block_rows < 1:
            raise ConfigError(f"block rows must be >= 1, got {self.block_rows}")
        if any(a not in (0, 1, 2) for a in self.mirror_axes):
            raise ConfigError(f"mirror axes must be among (0, 1, 2), got {self.mirror_axes}")


def compute_steps(image_size, tile_size, step: float) -> list[list[int]]:
    """nnU-Net's ``compute_steps_for_sliding_window``: n = ceil((size - tile) / (tile * step)) + 1
    tiles per axis, evenly spaced over [0, size - tile] and rounded."""
    steps = []
    for size, tile in zip(image_size, tile_size):
        n = int(np.ceil((size - tile) / (tile * step))) + 1
        span = size - tile
        actual = span / (n - 1) if n > 1 else 99999999999
        steps.append([int(np.round(actual * i)) for i in range(n)])
    return steps


@lru_cache(maxsize=4)
def _gaussian_np(tile: tuple[int, ...], sigma_scale: float, value_scaling: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    tmp = np.zeros(tile)
    tmp[tuple(t // 2 for t in tile)] = 1
    g = gaussian_filter(tmp, [t * sigma_scale for t in tile], 0, mode="constant", cval=0)
    g /= np.max(g) / value_scaling
    g = g.astype(np.float32)
    g[g == 0] = g[g > 0].min()  # zeros would give NaN where only one tile covers a voxel
    g.setflags(write=False)
    return g


_DEVICE_GAUSSIANS: dict[tuple, object] = {}


def gaussian_map(tile, xp=np, sigma_scale: float = 1.0 / 8, value_scaling: float = 10.0):
    """nnU-Net's importance map: sigma = tile/8, max scaled to 10, zeros replaced by the smallest value.
    Computed once per tile shape, and uploaded once per device (not per call)."""
    key = (tuple(int(t) for t in tile), sigma_scale, value_scaling)
    g = _gaussian_np(*key)
    if xp is np:
        return g
    device = xp.cuda.Device().id if hasattr(xp, "cuda") else 0
    dev_key = (xp.__name__, device, *key)
    if dev_key not in _DEVICE_GAUSSIANS:
        _DEVICE_GAUSSIANS[dev_key] = to_device(g, xp)
    return _DEVICE_GAUSSIANS[dev_key]


def pad_to_patch(image, patch):
    """Zero-pad (C, Z, Y, X) to at least ``patch`` (symmetric, as acvl_utils.pad_nd_image);
    returns the padded array and the slices that undo the padding."""
    xp = array_module(image)
    spatial = image.shape[1:]
    pads = [(max(p - s, 0) // 2, max(p - s, 0) - max(p - s, 0) // 2) for s, p in zip(spatial, patch)]
    if not any(a or b for a, b in pads):
        return image, tuple(slice(0, s) for s in spatial)
    out = xp.pad(image, [(0, 0), *pads], mode="constant", constant_values=0)
    return out, tuple(slice(a, a + s) for (a, _), s in zip(pads, spatial))


def _predict(network: Network, batch, mirror_axes: tuple[int, ...]):
    """Network output, averaged over all flip combinations of ``mirror_axes`` (nnU-Net's TTA)."""
    xp = array_module(batch)
    # float32 blending; a copy when more calls follow (a backend may reuse its output buffer, TensorRT does)
    pred = network(batch).astype(xp.float32, copy=bool(mirror_axes))
    if mirror_axes:
        combos = [c for i in range(len(mirror_axes)) for c in itertools.combinations(mirror_axes, i + 1)]
        for axes in combos:
            ax = tuple(a + 2 for a in axes)
            pred = pred + xp.flip(network(xp.ascontiguousarray(xp.flip(batch, ax))), ax)
        pred = pred / (len(combos) + 1)
    return pred


def over_classes(fn: Callable[[slice], None], num_classes: int, xp, threads: int | None = None) -> None:
    """``fn(classes)`` over slices that cover the class axis: on the CPU on threads
    (:func:`flare_rt.threads.run_split`: the network's threads are idle while the window blends), so
    these passes take half the time or less on 2 cores; on a GPU one call."""
    run_split(fn, class_slices(num_classes, threads, xp), threads, xp)


def tile_origins(shape, cfg: WindowConfig) -> list[tuple[int, int, int]]:
    steps = compute_steps(shape, cfg.patch_size, cfg.step)
    return [tuple(o) for o in itertools.product(*steps)]  # z-major, as nnU-Net


def sliding_window_blocks(image, network: Network, num_classes: int, cfg: WindowConfig,
                          keep_tile: Callable[[tuple[int, int, int]], bool] | None = None,
                          progress=None) -> Iterator[tuple[int, int, object]]:
    """Yield ``(z0, z1, logits[:, z0:z1])`` blocks of the blended float32 logits of a (C, Z, Y, X)
    image, in order, covering all rows. ``keep_tile(origin)`` may skip tiles (fast mode): rows no
    kept tile covers get logits 0 with background 1 (certain background). ``progress`` (a tqdm-like
    object) is reset to the number of tiles to run and updated after each batch."""
    xp = array_module(image)
    padded, unpad = pad_to_patch(image, cfg.patch_size)
    shape = padded.shape[1:]
    pz, py, px = cfg.patch_size
    origins = tile_origins(shape, cfg)
    if keep_tile is not None:
        kept = [o for o in origins if keep_tile(o)]
        log.info("sliding window: %d of %d tiles hold the region of interest", len(kept), len(origins))
        origins = kept
    if progress is not None:
        progress.reset(total=len(origins))
    gauss = gaussian_map(cfg.patch_size, xp) if cfg.gaussian else xp.ones(cfg.patch_size, dtype=xp.float32)
    z_starts = sorted({o[0] for o in origins})
    by_z = {z: [o for o in origins if o[0] == z] for z in z_starts}
    # rolling buffer over padded rows [lo, lo + depth)
    depth = pz  # tiles start at the first row not yet emitted, so one patch depth suffices
    acc = xp.zeros((num_classes, depth, *shape[1:]), dtype=xp.float32)
    wsum = xp.zeros((depth, *shape[1:]), dtype=xp.float32)
    lo = 0  # first padded row not yet emitted
    z_lo, z_hi = unpad[0].start, unpad[0].stop

    def emit(upto: int):
        """Yield the finished padded rows [lo, upto) (in chunks of at most ``depth``) and shift the buffer."""
        nonlocal lo
        while lo < upto:
            n = min(upto - lo, depth)
            a, b = max(lo, z_lo), min(lo + n, z_hi)
            rows = cfg.block_rows or max(b - a, 1)
            for c0 in range(a, b, rows):
                c1 = min(c0 + rows, b)
                blk = acc[:, c0 - lo:c1 - lo, unpad[1], unpad[2]]
                w = wsum[c0 - lo:c1 - lo, unpad[1], unpad[2]]
                # every voxel covered (no tile skipped; the Gaussian is > 0): logits / weight; else voxels no
                # kept tile covers get logits 0 (x / inf) and background 1 (certain background); no sync
                covered = None if keep_tile is None else w > 0
                denom = w if covered is None else xp.where(covered, w, xp.float32(xp.inf))
                out = xp.empty(blk.shape, dtype=xp.float32)
                over_classes(lambda k: xp.divide(blk[k], denom, out=out[k]), num_classes, xp, cfg.threads)
                if covered is not None:
                    out[0] += ~covered
                del blk, w, denom, covered  # only ``out`` lives on while the consumer works
                yield c0 - z_lo, c1 - z_lo, out
                del out

            def shift(buf):
                """Rows [n, depth) of (C, depth, ...) ``buf`` to the front, in chunks of n rows front to back
                (no chunk overlaps its source, so no temporary), and zeros behind them."""
                for i in range(0, depth - n, n):
                    j = min(i + n, depth - n)
                    buf[:, i:j] = buf[:, i + n:j + n]
                buf[:, depth - n:] = 0

            over_classes(lambda k: shift(acc[k]), num_classes, xp, cfg.threads)
            shift(wsum[None])
            lo += n

    batch_imgs, batch_orig = [], []
    native = native_enabled(xp)

    def flush_batch():
        if not batch_imgs:
            return
        pred = _predict(network, xp.stack(batch_imgs), cfg.mirror_axes)
        if native:  # one launch, the same float32 operations in the same tile order
            from .kernels import accumulate_tiles

            accumulate_tiles(acc, wsum, pred, gauss, [(z - lo, y, x) for z, y, x in batch_orig])
        else:
            for p, (z, y, x) in zip(pred, batch_orig):
                region = (slice(z - lo, z - lo + pz), slice(y, y + py), slice(x, x + px))

                def blend(k, p=p, region=region):
                    pk = p[k]
                    pk *= gauss
                    acc[(k, *region)] += pk

                over_classes(blend, num_classes, xp, cfg.threads)
                wsum[region] += gauss
        if progress is not None:
            progress.update(len(batch_imgs))
        batch_imgs.clear()
        batch_orig.clear()

    for i, z in enumerate(z_starts):
        if z + pz - lo > depth:  # should not happen: depth covers the largest step
            yield from emit(z)
        for o in by_z[z]:
            batch_imgs.append(padded[:, o[0]:o[0] + pz, o[1]:o[1] + py, o[2]:o[2] + px])
            batch_orig.append(o)
            if len(batch_imgs) == cfg.batch_size:
                flush_batch()
        flush_batch()
        nxt = z_starts[i + 1] if i + 1 < len(z_starts) else shape[0]
        yield from emit(nxt)
    if lo < shape[0]:
        yield from emit(shape[0])


def sliding_window(image, network: Network, num_classes: int, cfg: WindowConfig, keep_tile=None, progress=None):
    """The whole (K, Z, Y, X) float32 logits (convenience over :func:`sliding_window_blocks`)."""
    xp = array_module(image)
    out = xp.empty((num_classes, *image.shape[1:]), dtype=xp.float32)
    for z0, z1, blk in sliding_window_blocks(image, network, num_classes, cfg, keep_tile, progress):
        out[:, z0:z1] = blk
    return out
