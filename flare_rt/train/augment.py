"""Augmentation: parameters drawn per patch on the CPU (numpy, seeded per batch), applied to the whole
batch in torch on whatever device the batch lives on.

Spatial: rotation, scaling, elastic deformation and mirroring compose into one sampling grid per patch
(``grid_sample``, trilinear for the image, nearest for the labels), so image and labels are warped by
the same map. The map takes an output voxel offset ``o`` from the patch centre to the source position
``centre + M @ o + d(o)``: ``M = diag(1/spacing) R diag(spacing) F / s`` (rotation ``R`` in millimetres,
mirror ``F``, zoom ``s``) and ``d`` a smooth displacement interpolated from a coarse control grid.
Because ``d`` is a convex combination of control values, the source extent of a patch is known exactly
before sampling, and the sampler reads only that region. Intensity: additive brightness and gamma.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .config import AugmentConfig

Triple = tuple[int, int, int]


@dataclass(frozen=True)
class SampleDraw:
    """The random draw of one patch."""

    matrix: np.ndarray  # (3, 3) output offset (voxels) -> source offset (voxels)
    elastic: np.ndarray  # (3, gz, gy, gx) control displacements, source voxels
    brightness: float  # additive
    gamma: float  # 1: off
    gamma_invert: bool
    flips: tuple[float, float, float] = (1.0, 1.0, 1.0)  # -1 where the axis is mirrored


def control_grid(patch: Triple, spacing, grid_mm: float) -> Triple:
    """Control points per axis of the elastic field (>= 2)."""
    return tuple(max(2, math.ceil(p * s / grid_mm) + 1) for p, s in zip(patch, spacing))  # type: ignore[return-value]


def rotation_matrix(angles_rad) -> np.ndarray:
    """Rotation about the z, then y, then x axis, in (z, y, x) coordinates."""
    a, b, c = angles_rad
    rz = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rx = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def spatial_matrix(angles_rad, zoom: float, flips, spacing) -> np.ndarray:
    sp = np.asarray(spacing, dtype=np.float64)
    return np.diag(1 / sp) @ rotation_matrix(angles_rad) @ np.diag(sp) @ np.diag(np.asarray(flips, float)) / zoom


def draw_sample(rng: np.random.Generator, cfg: AugmentConfig, spacing, patch: Triple) -> SampleDraw:
    """One patch's augmentation parameters (a fixed number of draws per decision, in a fixed order)."""
    angles = np.zeros(3)
    if rng.random() < cfg.p_rotation:
        angles = np.radians([rng.uniform(-m, m) for m in cfg.rotation_deg])
    zoom = rng.uniform(*cfg.scale_range) if rng.random() < cfg.p_scale else 1.0
    flips = [-1.0 if (a in cfg.mirror_axes and rng.random() < cfg.p_mirror) else 1.0 for a in range(3)]
    grid = control_grid(patch, spacing, cfg.elastic_grid_mm)
    elastic = np.zeros((3, *grid), np.float32)
    if rng.random() < cfg.p_elastic and cfg.elastic_magnitude_mm > 0:
        mag = rng.uniform(0, cfg.elastic_magnitude_mm)
        mm = np.clip(rng.normal(0, mag, (3, *grid)), -3 * mag, 3 * mag)
        elastic = (mm / np.asarray(spacing, float).reshape(3, 1, 1, 1)).astype(np.float32)
    brightness = float(rng.normal(0, cfg.brightness_sigma)) if rng.random() < cfg.p_brightness else 0.0
    gamma, invert = 1.0, False
    if rng.random() < cfg.p_gamma:
        lo, hi = cfg.gamma_range
        gamma = rng.uniform(lo, 1.0) if (rng.random() < 0.5 and lo < 1) else rng.uniform(max(lo, 1.0), hi)
        invert = bool(rng.random() < cfg.p_gamma_invert)
    return SampleDraw(spatial_matrix(angles, zoom, flips, spacing).astype(np.float32), elastic, brightness,
                      float(gamma), invert, tuple(flips))  # type: ignore[arg-type]


def source_extent(draw: SampleDraw, patch: Triple) -> tuple[np.ndarray, np.ndarray]:
    """Exact (min, max) source offsets (voxels, per axis) the patch samples, relative to its centre."""
    half = (np.asarray(patch, float) - 1) / 2
    corners = np.array(np.meshgrid(*[(-h, h) for h in half], indexing="ij")).reshape(3, -1)
    mapped = draw.matrix.astype(np.float64) @ corners
    d = np.abs(draw.elastic).reshape(3, -1).max(axis=1)
    return mapped.min(axis=1) - d, mapped.max(axis=1) + d


# -- torch, batched ------------------------------------------------------------------------------------
def sampling_grid(centre, matrix, elastic, patch: Triple, region_shape):
    """``grid_sample`` grid (B, *patch, 3) mapping each output voxel into the (B, C, *region) input.

    centre (B, 3): patch centre in region voxel coordinates; matrix (B, 3, 3); elastic (B, 3, g, g, g)."""
    import torch
    import torch.nn.functional as F

    dev = matrix.device
    axes = [torch.arange(p, device=dev, dtype=torch.float32) - (p - 1) / 2 for p in patch]
    offsets = torch.stack(torch.meshgrid(*axes, indexing="ij"))  # (3, *patch)
    src = torch.einsum("bij,j...->bi...", matrix, offsets) + centre[:, :, None, None, None]
    if bool(elastic.abs().amax() > 0):
        src = src + F.interpolate(elastic, size=tuple(patch), mode="trilinear", align_corners=True)
    size = torch.tensor(region_shape, device=dev, dtype=torch.float32).view(1, 3, 1, 1, 1)
    norm = 2 * src / (size - 1).clamp(min=1) - 1
    return norm.flip(1).permute(0, 2, 3, 4, 1)  # grid_sample wants (x, y, z) last


def warp(image, labels, grid):
    """Trilinear image, nearest labels (the ignore label included), both through ``grid`` (zeros outside
    the region)."""
    import torch.nn.functional as F

    out = F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    lab = F.grid_sample(labels.float(), grid, mode="nearest", padding_mode="zeros", align_corners=True)
    return out, lab.round().to(labels.dtype)


def brightness(image, add):
    """Additive brightness: ``add`` (B,) per patch."""
    return image + add.view(-1, *([1] * (image.ndim - 1)))


def gamma(image, gammas, invert, eps: float = 1e-7):
    """nnU-Net's gamma with retained mean and std; ``invert`` applies it to the negated image. Patches
    with gamma == 1 and no inversion are returned unchanged."""
    import torch

    b = image.shape[0]
    dims = tuple(range(1, image.ndim))
    shape = (b, *([1] * (image.ndim - 1)))
    sign = torch.where(invert, -1.0, 1.0).view(shape).to(image.dtype)
    x = image * sign
    mean, std = x.mean(dims, keepdim=True), x.std(dims, keepdim=True)
    lo = x.amin(dims, keepdim=True)
    rng = x.amax(dims, keepdim=True) - lo + eps
    y = ((x - lo) / rng).clamp(min=0) ** gammas.view(shape).to(image.dtype) * rng + lo
    y = (y - y.mean(dims, keepdim=True)) / (y.std(dims, keepdim=True) + 1e-8) * std + mean
    active = ((gammas != 1) | invert).view(shape)
    return torch.where(active, y * sign, image)


def swap_sides(labels, swap):
    """Labels (B, 1, ...) with right/left kidney and adrenal exchanged in the patches where ``swap`` (B,)
    is set (those mirrored along the patient's left-right axis); the ignore label is kept."""
    import torch

    from ..laterality import swap_table

    if not bool(swap.any()):
        return labels
    lut = torch.from_numpy(swap_table()).to(labels.device)
    swapped = lut[labels.long()].to(labels.dtype)
    return torch.where(swap.view(-1, *([1] * (labels.ndim - 1))), swapped, labels)


def augment_batch(batch: dict, patch: Triple) -> tuple:
    """Warp and intensity-augment a sampled batch (tensors on the target device) to ``patch``.

    ``batch``: image (B, C, *region) float, labels (B, 1, *region), centre (B, 3), matrix (B, 3, 3),
    elastic (B, 3, ...), brightness (B,), gamma (B,), gamma_invert (B,) bool, and optionally swap_lr (B,)
    bool: the patches mirrored along the patient's left-right axis, whose lateral labels are swapped."""
    grid = sampling_grid(batch["centre"], batch["matrix"], batch["elastic"], patch, batch["image"].shape[2:])
    image, labels = warp(batch["image"], batch["labels"], grid)
    if "swap_lr" in batch:
        labels = swap_sides(labels, batch["swap_lr"])
    if bool((batch["brightness"] != 0).any()):
        image = brightness(image, batch["brightness"])
    if bool(((batch["gamma"] != 1) | batch["gamma_invert"]).any()):
        image = gamma(image, batch["gamma"], batch["gamma_invert"])
    return image, labels
