"""Preprocessing as pure functions, faithful to nnU-Net v2's DefaultPreprocessor:
crop to the non-zero box, CT normalisation, then resampling (see :mod:`flare_rt.resample`)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .bundle import CTNormalization
from .xp import array_module

BBox = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]  # half-open [start, end) per axis


@dataclass(frozen=True)
class CropInfo:
    shape_before: tuple[int, int, int]
    bbox: BBox

    @property
    def shape_after(self) -> tuple[int, int, int]:
        return tuple(e - s for s, e in self.bbox)  # type: ignore[return-value]

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        return tuple(slice(s, e) for s, e in self.bbox)  # type: ignore[return-value]


def bbox_of(mask) -> BBox:
    """Half-open bounding box of a boolean mask; the full volume if the mask is empty (as nnU-Net)."""
    xp = array_module(mask)
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = xp.flatnonzero(mask.any(axis=other))
        box.append((int(hits[0]), int(hits[-1]) + 1) if hits.size else (0, mask.shape[axis]))
    return tuple(box)  # type: ignore[return-value]


def nonzero_crop(image) -> CropInfo:
    """nnU-Net's crop: bounding box of ``binary_fill_holes(image != 0)``. Filling holes never changes
    a bounding box, so the fill is skipped (the box is all nnU-Net uses at inference)."""
    return CropInfo(tuple(image.shape), bbox_of(image != 0))  # type: ignore[arg-type]


def body_crop(image, threshold_hu: float = -500.0, margin: int = 4, base: CropInfo | None = None) -> CropInfo:
    """Fast-mode ROI: bounding box of voxels above ``threshold_hu`` (the body, table mostly excluded),
    grown by ``margin`` voxels and kept inside ``base``."""
    base = base or CropInfo(tuple(image.shape), tuple((0, s) for s in image.shape))  # type: ignore[arg-type]
    sub = image[base.slices] > threshold_hu
    if not bool(sub.any()):
        return base
    inner = bbox_of(sub)
    box = tuple((max(b0 + s - margin, b0), min(b0 + e + margin, b1))
                for (s, e), (b0, b1) in zip(inner, base.bbox))
    return CropInfo(base.shape_before, box)  # type: ignore[arg-type]


def ct_normalize(image, norm: CTNormalization, out_dtype=np.float32):
    """Clip to [lower, upper], subtract mean, divide by max(std, 1e-8), in ``out_dtype`` as nnU-Net."""
    xp = array_module(image)
    x = image.astype(out_dtype, copy=True)
    xp.clip(x, norm.lower, norm.upper, out=x)
    x -= out_dtype(norm.mean)
    x /= out_dtype(max(norm.std, 1e-8))
    return x


def compute_new_shape(shape, spacing, new_spacing) -> tuple[int, ...]:
    """nnU-Net's rule: round(old_spacing / new_spacing * old_shape) per axis (Python round, half to even)."""
    return tuple(int(round(s / n * k)) for s, n, k in zip(spacing, new_spacing, shape))


def paste(values, crop: CropInfo, fill=0):
    """Put a cropped array back into a zero volume of the uncropped shape (leading axes kept)."""
    xp = array_module(values)
    lead = values.shape[:-3]
    out = xp.full((*lead, *crop.shape_before), fill, dtype=values.dtype)
    out[(Ellipsis, *crop.slices)] = values
    return out
