"""Patch sampling with foreground oversampling, as batches a torch ``DataLoader`` fetches in background workers.

Batch ``i`` of a stream is a pure function of ``(seed, rank, stream, i)``: every draw comes from its own
``numpy.random.Generator``, so a run resumed at iteration ``i`` sees exactly the batches the
uninterrupted run saw, however many workers load them.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..labels import NUM_CLASSES
from ..laterality import swap_classes
from .augment import SampleDraw, draw_sample, source_extent
from .cache import CachedCase, open_case, unpack
from .config import AugmentConfig

log = logging.getLogger(__name__)

Triple = tuple[int, int, int]
TRAIN_STREAM, VAL_STREAM = 0, 1


@dataclass(frozen=True)
class SamplerSpec:
    patch: Triple
    spacing: tuple[float, float, float]
    batch_size: int  # per process
    oversample_foreground: float
    augment: AugmentConfig | None  # None: plain patches (validation)


def origin_range(shape: Sequence[int], patch: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Inclusive range of patch start indices per axis (nnU-Net's bounds): inside the volume where it is
    at least as large as the patch, else the starts that centre the volume in the padded patch."""
    shape, patch = np.asarray(shape, dtype=np.int64), np.asarray(patch, dtype=np.int64)
    pad = np.maximum(patch - shape, 0)
    return -pad // 2, shape + pad // 2 + pad % 2 - patch


def choose_origin(rng: np.random.Generator, case: CachedCase, patch: Triple, foreground: bool) -> np.ndarray:
    """Start index of a patch: centred on a random voxel of a random annotated class present in the case
    when ``foreground``, else uniform."""
    lo, hi = origin_range(case.shape, patch)
    classes = [k for k in sorted(case.locations) if k in case.annotated and len(case.locations[k])]
    if foreground and classes:
        k = classes[int(rng.integers(len(classes)))]
        locs = case.locations[k]
        voxel = locs[int(rng.integers(len(locs)))].astype(np.int64)
        return np.clip(voxel - np.asarray(patch) // 2, lo, hi)
    return np.array([int(rng.integers(a, b + 1)) for a, b in zip(lo, hi)])


def extract(array: np.ndarray, lo: Sequence[int], hi: Sequence[int], fill=0) -> np.ndarray:
    """``array[lo:hi]`` with ``fill`` where the box leaves the array."""
    out = np.full(tuple(int(b - a) for a, b in zip(lo, hi)), fill, dtype=array.dtype)
    src = tuple(slice(max(a, 0), min(b, s)) for a, b, s in zip(lo, hi, array.shape))
    dst = tuple(slice(s.start - a, s.stop - a) for s, a in zip(src, lo))
    if all(s.stop > s.start for s in src):
        out[dst] = array[src]
    return out


def source_region(origin: np.ndarray, draw: SampleDraw, patch: Triple) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lo, hi, centre): the box of case voxels a warped patch starting at ``origin`` reads (with the
    neighbours trilinear interpolation needs), and the patch centre in that box's coordinates."""
    c = np.asarray(origin) + (np.asarray(patch) - 1) / 2  # patch centre, voxel coordinates of the case
    dmin, dmax = source_extent(draw, patch)
    lo = np.floor(c + dmin).astype(np.int64)
    hi = np.floor(c + dmax).astype(np.int64) + 2
    return lo, hi, c - lo


def annotated_mask(annotated: Sequence[int]) -> np.ndarray:
    m = np.zeros(NUM_CLASSES, bool)
    m[list(annotated)] = True
    return m


def _pad_to(a: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    return np.pad(a, [(0, int(s) - n) for n, s in zip(a.shape, shape)]) if tuple(a.shape) != tuple(shape) else a


class PatchBatches:
    """Map-style dataset: ``batches[i]`` is batch ``i`` of one stream (dict of CPU tensors).

    ``cases``: ``(id, annotated classes[, left-right array axis])``; a patch mirrored along its case's
    left-right axis gets its lateral labels swapped (``swap_lr``). Cases are opened lazily in each worker
    process (memory maps are not sent between processes)."""

    def __init__(self, cache_dir: str | Path, cases: Sequence[tuple], spec: SamplerSpec,
                 seed: int, rank: int = 0, stream: int = TRAIN_STREAM):
        if not cases:
            raise ValueError("PatchBatches needs at least one case")
        self.cache_dir, self.spec = str(cache_dir), spec
        self.cases = [(c[0], tuple(c[1])) for c in cases]
        self.lr_axes = [c[2] if len(c) > 2 else None for c in cases]
        self.seed, self.rank, self.stream = int(seed), int(rank), int(stream)
        self._open: dict[str, CachedCase] = {}

    def prepare(self) -> "PatchBatches":
        """Unpack every case now (call in the main process before starting workers)."""
        for case_id, _ in self.cases:
            unpack(self.cache_dir, case_id)
        return self

    def __len__(self) -> int:
        return 2**62  # indexed by iteration number; the sampler bounds it

    def case(self, k: int) -> CachedCase:
        case_id, annotated = self.cases[k]
        if case_id not in self._open:
            self._open[case_id] = open_case(self.cache_dir, case_id, annotated)
        return self._open[case_id]

    def rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.rank, self.stream, int(index)])

    def __getitem__(self, index: int) -> dict:
        import torch

        rng, spec = self.rng(index), self.spec
        patch = tuple(spec.patch)
        images, labels, centres, draws, annotated, swaps = [], [], [], [], [], []
        for _ in range(spec.batch_size):
            k = int(rng.integers(len(self.cases)))
            case = self.case(k)
            foreground = bool(rng.random() < spec.oversample_foreground)
            origin = choose_origin(rng, case, patch, foreground)
            if spec.augment is None:
                lo, hi, centre, draw = origin, origin + np.asarray(patch), None, None
            else:
                draw = draw_sample(rng, spec.augment, spec.spacing, patch)
                lo, hi, centre = source_region(origin, draw, patch)
            images.append(extract(case.image, lo, hi, 0.0))
            labels.append(extract(case.labels, lo, hi, 0))
            centres.append(centre)
            draws.append(draw)
            swap = draw is not None and self.lr_axes[k] is not None and draw.flips[self.lr_axes[k]] < 0
            annotated.append(annotated_mask(swap_classes(case.annotated) if swap else case.annotated))
            swaps.append(swap)
        shape = np.max([a.shape for a in images], axis=0)
        out = {"image": torch.from_numpy(np.stack([_pad_to(a, shape) for a in images])[:, None]),
               "labels": torch.from_numpy(np.stack([_pad_to(a, shape) for a in labels])[:, None]),
               "annotated": torch.from_numpy(np.stack(annotated))}
        if spec.augment is not None:
            out.update(draws_to_tensors(draws, centres))
            out["swap_lr"] = torch.tensor(swaps, dtype=torch.bool)
        return out


def draws_to_tensors(draws: Sequence[SampleDraw], centres: Sequence[np.ndarray]) -> dict:
    import torch

    return {"centre": torch.from_numpy(np.stack(centres).astype(np.float32)),
            "matrix": torch.from_numpy(np.stack([d.matrix for d in draws]).astype(np.float32)),
            "elastic": torch.from_numpy(np.stack([d.elastic for d in draws]).astype(np.float32)),
            "brightness": torch.tensor([d.brightness for d in draws], dtype=torch.float32),
            "gamma": torch.tensor([d.gamma for d in draws], dtype=torch.float32),
            "gamma_invert": torch.tensor([d.gamma_invert for d in draws], dtype=torch.bool)}


def make_loader(batches: PatchBatches, start: int, stop: int, workers: int, pin_memory: bool,
                persistent: bool = False):
    """A ``DataLoader`` over batches ``start..stop-1`` in order, prefetched by ``workers`` processes."""
    from torch.utils.data import DataLoader

    return DataLoader(batches, batch_size=None, sampler=range(start, stop), num_workers=workers,
                      pin_memory=pin_memory, persistent_workers=persistent and workers > 0,
                      prefetch_factor=max(2, math.ceil(4 / max(workers, 1))) if workers > 0 else None)
