"""Surface elements and the normalised surface Dice (NSD) of DeepMind's ``surface-distance``.

The surface of a binary mask is sampled on the grid of voxel *corners*: every corner sees the
2x2x2 voxels around it, whose inside/outside pattern is an 8-bit *neighbour code*. A code other
than 0 (all outside) and 255 (all inside) marks a surface element ("surfel"); its area is the area
of the marching-cubes surface inside that 2x2x2 cell, scaled by the voxel spacing. NSD at a
tolerance is the surfel area of each surface lying within the tolerance of the other surface,
over the total surfel area of both, with distances from an anisotropic Euclidean distance
transform on the corner grid.

The neighbour-code area table is derived here from its definition instead of being copied:

* bit ``1 << (7 - (4a + 2b + c))`` of a code is the voxel at offset ``(a, b, c)`` in the cell
  (DeepMind's kernel ``[[[128, 64], [32, 16]], [[8, 4], [2, 1]]]``);
* a cell with more than four inside corners has the surface of its complement;
* each edge-connected group of inside corners is enclosed by one polygon through the midpoints of
  the cell edges it cuts;
* the polygon is cut into triangles along its maximal-area triangulation (at unit spacing), which
  is the triangulation of the classic marching-cubes table on every non-planar pentagon and
  hexagon; each triangle keeps its area vector ``n`` (normal times area);
* at spacing ``(s0, s1, s2)`` a triangle's area is ``|(n0 s1 s2, n1 s0 s2, n2 s0 s1)|``.

``tests/evaluate/test_surface.py`` checks the result against areas of DeepMind's table.
"""
from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

Corner = tuple[int, int, int]
Edge = frozenset  # frozenset of two corners

_CORNERS: tuple[Corner, ...] = tuple(itertools.product((0, 1), repeat=3))  # type: ignore[assignment]


def corner_bit(corner: Corner) -> int:
    """Bit of the neighbour code that holds the voxel at offset ``corner`` in the 2x2x2 cell."""
    a, b, c = corner
    return 1 << (7 - (4 * a + 2 * b + c))


# ----------------------------------------------------------------------------------------------
# The neighbour-code table, derived from marching cubes on a single 2x2x2 cell.


def _neighbours(corner: Corner) -> list[Corner]:
    return [tuple(v ^ (axis == k) for k, v in enumerate(corner)) for axis in range(3)]  # type: ignore[misc]


def _components(corners: set[Corner]) -> list[frozenset[Corner]]:
    """Groups of corners connected through cell edges."""
    left, groups = set(corners), []
    while left:
        stack = [left.pop()]
        group = set(stack)
        while stack:
            for n in _neighbours(stack.pop()):
                if n in left:
                    left.remove(n)
                    group.add(n)
                    stack.append(n)
        groups.append(frozenset(group))
    return groups


def _face_cycles() -> list[list[Corner]]:
    """The four corners of each of the six cell faces, in cyclic order."""
    cycles = []
    for axis, value in itertools.product(range(3), (0, 1)):
        u, v = (k for k in range(3) if k != axis)
        cycle = []
        for s, t in ((0, 0), (1, 0), (1, 1), (0, 1)):
            corner = [0, 0, 0]
            corner[axis], corner[u], corner[v] = value, s, t
            cycle.append(tuple(corner))
        cycles.append(cycle)
    return cycles  # type: ignore[return-value]


def _polygon(group: frozenset[Corner]) -> np.ndarray:
    """Vertices (k, 3), in cyclic order, of the surface polygon around one group of corners.

    On every face the group covers partly, the surface crosses the face in one segment joining the
    two cut edges at the ends of the group's arc; the segments chain into a closed polygon.
    """
    links: dict[Edge, list[Edge]] = {}
    for cycle in _face_cycles():
        cut = [
            frozenset((cycle[i], cycle[(i + 1) % 4]))
            for i in range(4)
            if (cycle[i] in group) != (cycle[(i + 1) % 4] in group)
        ]
        if not cut:
            continue
        if len(cut) != 2:  # cannot happen for groups of at most four corners
            raise AssertionError(f"face crossed {len(cut)} times by corner group {sorted(group)}")
        links.setdefault(cut[0], []).append(cut[1])
        links.setdefault(cut[1], []).append(cut[0])
    start = next(iter(links))
    order, previous, current = [start], None, start
    while True:
        following = links[current][0] if links[current][0] != previous else links[current][1]
        if following == start:
            break
        order.append(following)
        previous, current = current, following
    return np.array([np.mean([np.array(c) for c in edge], axis=0) for edge in order], float)


def _triangulations(n: int) -> list[list[tuple[int, int, int]]]:
    """All triangulations of a polygon with vertices 0..n-1 (14 for a hexagon)."""

    @functools.cache
    def between(i: int, j: int) -> tuple[tuple[tuple[int, int, int], ...], ...]:
        if j - i < 2:
            return ((),)
        return tuple(
            left + right + ((i, k, j),)
            for k in range(i + 1, j)
            for left in between(i, k)
            for right in between(k, j)
        )

    return [list(t) for t in between(0, n - 1)]


def _triangle_area_vectors(polygon: np.ndarray) -> np.ndarray:
    """Area vectors (k-2, 3) of the maximal-area triangulation of a polygon."""
    best, best_area = None, -1.0
    for triangles in _triangulations(len(polygon)):
        a, b, c = (polygon[[t[k] for t in triangles]] for k in range(3))
        vectors = 0.5 * np.cross(b - a, c - a)
        area = float(np.linalg.norm(vectors, axis=1).sum())
        if area > best_area + 1e-12:
            best, best_area = vectors, area
    return best  # type: ignore[return-value]


@functools.cache
def neighbour_code_normals() -> tuple[np.ndarray, ...]:
    """For each of the 256 codes, the area vectors (k, 3) of its surface triangles at unit spacing."""
    table = []
    for code in range(256):
        inside = {c for c in _CORNERS if code & corner_bit(c)}
        if len(inside) > 4:
            inside = set(_CORNERS) - inside
        vectors = [_triangle_area_vectors(_polygon(g)) for g in _components(inside)]
        normals = np.concatenate(vectors) if vectors else np.zeros((0, 3))
        normals.setflags(write=False)
        table.append(normals)
    return tuple(table)


@functools.lru_cache(maxsize=64)
def _surface_area_table(spacing: tuple[float, float, float]) -> np.ndarray:
    s0, s1, s2 = spacing
    scale = np.array([s1 * s2, s0 * s2, s0 * s1])
    areas = np.array([np.linalg.norm(n * scale, axis=1).sum() for n in neighbour_code_normals()])
    areas.setflags(write=False)
    return areas


def surface_area_table(spacing: Sequence[float]) -> np.ndarray:
    """Surface area in mm^2 of each of the 256 neighbour codes at ``spacing`` (read-only)."""
    return _surface_area_table(tuple(float(s) for s in spacing))  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------
# Surfels of a mask and NSD.


def neighbour_codes(mask: np.ndarray) -> np.ndarray:
    """Neighbour code of every voxel corner of ``mask``: shape ``mask.shape + 1`` per axis.

    Corner ``i`` of an axis lies between voxels ``i - 1`` and ``i``; voxels outside the array are
    background. This is DeepMind's ``correlate(mask, kernel, mode="constant")`` on the mask padded
    with one background voxel at the high end of each axis.
    """
    padded = np.pad(mask.astype(np.uint8, copy=False), 1)
    n0, n1, n2 = (s + 1 for s in mask.shape)
    codes = np.zeros((n0, n1, n2), np.uint8)
    for a, b, c in _CORNERS:
        shift = 7 - (4 * a + 2 * b + c)
        codes |= padded[a : a + n0, b : b + n1, c : c + n2] << np.uint8(shift)
    return codes


def surface_dice(
    gt: np.ndarray, pred: np.ndarray, spacing: Sequence[float], tolerance_mm: float
) -> float:
    """Normalised surface Dice of two boolean masks of the same shape.

    Voxels outside the arrays count as background, so the masks may be crops of larger volumes
    as long as each crop holds every foreground voxel of both masks: all surfels then lie on the
    crop's corner grid and the exact Euclidean distance transform gives the same distances as on
    the whole volume. Returns NaN when both masks are empty, as DeepMind's code does (0 / 0).
    """
    if gt.shape != pred.shape:
        raise ValueError(f"mask shapes differ: {gt.shape} vs {pred.shape}")
    sampling = tuple(float(s) for s in spacing)
    areas = surface_area_table(sampling)
    codes_gt, codes_pred = neighbour_codes(gt), neighbour_codes(pred)
    border_gt = (codes_gt != 0) & (codes_gt != 255)
    border_pred = (codes_pred != 0) & (codes_pred != 255)
    surfels_gt, surfels_pred = np.nonzero(border_gt), np.nonzero(border_pred)
    area_gt, area_pred = areas[codes_gt[surfels_gt]], areas[codes_pred[surfels_pred]]
    total = area_gt.sum() + area_pred.sum()
    if total == 0:
        return float("nan")
    if area_gt.size == 0 or area_pred.size == 0:
        return 0.0  # every distance to an empty surface is infinite
    gt_to_pred = distances_at(surfels_gt, border_pred, sampling)
    pred_to_gt = distances_at(surfels_pred, border_gt, sampling)
    overlap = area_gt[gt_to_pred <= tolerance_mm].sum() + area_pred[pred_to_gt <= tolerance_mm].sum()
    return float(overlap / total)


def distances_at(
    points: tuple[np.ndarray, ...], features: np.ndarray, sampling: Sequence[float]
) -> np.ndarray:
    """Distance in mm from each voxel ``points`` (``np.nonzero`` order) to the nearest ``True``
    voxel of ``features``: ``distance_transform_edt(~features, sampling)[points]`` to the bit.

    Runs scipy's feature transform once and evaluates its distance formula, in scipy's order of
    operations, at the points only, instead of building the distance map of the whole array.
    """
    nearest = ndimage.distance_transform_edt(
        ~features, sampling=sampling, return_distances=False, return_indices=True
    )
    offsets = np.stack(
        [(nearest[k][points] - points[k]).astype(np.float64) * float(s) for k, s in enumerate(sampling)]
    )
    np.multiply(offsets, offsets, offsets)
    return np.sqrt(np.add.reduce(offsets, axis=0))
