"""Neighbour-code surface-area table, surfels and NSD on hand-built masks."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import ndimage

from flare_rt.evaluate.reference import KERNEL, reference_surface_dice
from flare_rt.evaluate.surface import (
    corner_bit,
    distances_at,
    neighbour_code_normals,
    neighbour_codes,
    surface_area_table,
    surface_dice,
)

# Checksums of DeepMind's table (surface_distance.lookup_tables.
# create_table_neighbour_code_to_surface_area(spacing), package surface-distance 0.1), computed
# with that package while writing the derivation: sum(area), sum(code * area), sum(code^2 * area).
DEEPMIND_CHECKSUMS = {
    (1.0, 1.0, 1.0): (241.34313970553745, 30771.250312456017, 5101347.181405662),
    (0.7, 1.3, 2.9): (591.6622968920757, 75436.94285373966, 12650232.978816621),
    (0.8, 0.8, 5.0): (772.8138816245778, 98533.76990713365, 16485635.577825297),
}
# Single entries of the same table (non-planar pentagon 7, hexagons 23, 27, two groups 105, 126).
DEEPMIND_ENTRIES = {
    (1.0, 1.0, 1.0): {7: 1.149519052838329, 23: 1.2990381056766578, 27: 1.573132184970986,
                      105: 0.8660254037844386, 126: 0.4330127018922193},
    (0.7, 1.3, 2.9): {7: 3.526536532490215, 23: 3.2830730649804307, 27: 3.7144422798875545,
                      105: 2.1887153766536205, 126: 1.0943576883268102},
}
# DeepMind's compute_surface_dice_at_tolerance on the shifted spheres below (development run).
DEEPMIND_SHIFTED_NSD = {(0, 3, 2.0): 0.9214487316502322, (2, 1, 2.0): 0.8314997391856964}
CORNERS = list(itertools.product((0, 1), repeat=3))


@pytest.mark.parametrize("spacing", list(DEEPMIND_CHECKSUMS))
def test_table_matches_deepmind_checksums(spacing):
    table, codes = surface_area_table(spacing), np.arange(256, dtype=np.float64)
    got = (table.sum(), (codes * table).sum(), (codes**2 * table).sum())
    assert got == pytest.approx(DEEPMIND_CHECKSUMS[spacing], rel=1e-12)


@pytest.mark.parametrize("spacing", list(DEEPMIND_ENTRIES))
def test_table_matches_deepmind_entries(spacing):
    table = surface_area_table(spacing)
    for code, area in DEEPMIND_ENTRIES[spacing].items():
        assert table[code] == pytest.approx(area, rel=1e-12), code


def test_table_hand_derived_cells():
    s0, s1, s2 = 0.7, 1.3, 2.9
    table = surface_area_table((s0, s1, s2))
    assert table[0] == 0 and table[255] == 0
    # one corner: a triangle through three edge midpoints, area vector (1/8, 1/8, 1/8)
    one = corner_bit((1, 1, 1))
    assert table[one] == pytest.approx(math.hypot(s1 * s2, s0 * s2, s0 * s1) / 8)
    # a face of four corners: a unit square cut halfway, normal to that axis
    for axis, area in enumerate((s1 * s2, s0 * s2, s0 * s1)):
        code = sum(corner_bit(c) for c in CORNERS if c[axis] == 1)
        assert table[code] == pytest.approx(area)
    # two corners along axis 2: a rectangle 1 x sqrt(2)/2, area vector (1/2, 1/2, 0)
    edge = corner_bit((1, 1, 1)) | corner_bit((1, 1, 0))
    assert table[edge] == pytest.approx(math.hypot(s1 * s2, s0 * s2) / 2)


def test_table_complement_and_axis_symmetry():
    spacing = (0.7, 1.3, 2.9)
    table = surface_area_table(spacing)
    assert np.allclose(table, table[255 - np.arange(256)], rtol=1e-12)
    for perm in itertools.permutations(range(3)):
        permuted = surface_area_table(tuple(spacing[p] for p in perm))
        for code in range(256):
            inside = [c for c in CORNERS if code & corner_bit(c)]
            moved = sum(corner_bit(tuple(c[p] for p in perm)) for c in inside)
            assert permuted[moved] == pytest.approx(table[code], rel=1e-12)


def test_triangle_counts():
    normals = neighbour_code_normals()
    assert len(normals) == 256 and len(normals[0]) == 0 and len(normals[255]) == 0
    assert len(normals[corner_bit((0, 0, 0))]) == 1  # a corner: one triangle
    assert len(normals[7]) == 3  # three corners on a face: a pentagon
    assert len(normals[27]) == 4  # a chain of four corners: a hexagon


def test_neighbour_codes_match_deepmind_correlation():
    rng = np.random.default_rng(1)
    mask = rng.random((9, 7, 8)) < 0.4
    expected = ndimage.correlate(np.pad(mask.astype(np.uint8), ((0, 1),) * 3), KERNEL, mode="constant")
    assert np.array_equal(neighbour_codes(mask), expected)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.8, 0.8, 2.5), (0.7, 1.3, 2.9)])
def test_distances_at_points_equal_the_distance_map_bit_for_bit(spacing):
    rng = np.random.default_rng(3)
    features = rng.random((23, 19, 11)) < 0.02
    points = np.nonzero(rng.random(features.shape) < 0.3)
    expected = ndimage.distance_transform_edt(~features, sampling=spacing)[points]
    assert np.array_equal(distances_at(points, features, spacing), expected)


def sphere(shape, center, radius_mm, spacing):
    grid = np.indices(shape, dtype=np.float64)
    return sum(((g - c) * s) ** 2 for g, c, s in zip(grid, center, spacing)) <= radius_mm**2


@pytest.mark.parametrize(
    "spacing, shape, center, deepmind_area",
    [  # deepmind_area: DeepMind's surface-distance on the same mask (development run)
        ((1.0, 1.0, 1.0), (50, 50, 50), (25, 25, 25), 5452.946572677967),
        ((0.8, 0.8, 2.5), (60, 60, 20), (30, 30, 10), 5849.425053769473),
    ],
)
def test_sphere_surface_area(spacing, shape, center, deepmind_area):
    mask = sphere(shape, center, 20.0, spacing)
    area = surface_area_table(spacing)[neighbour_codes(mask)].sum()
    assert area == pytest.approx(deepmind_area, rel=1e-12)
    # midpoint marching cubes on a voxelised sphere overestimates 4 pi r^2 (8 % and 16 % here)
    assert 1.0 < area / (4 * math.pi * 20.0**2) < 1.2


@pytest.mark.parametrize(
    "axis, shift, tolerance, expect_one",
    [
        (0, 2, 2.0, True),  # 1.6 mm shift < 2 mm
        (0, 3, 2.0, False),  # 2.4 mm > 2 mm
        (2, 1, 3.0, True),  # 2.5 mm < 3 mm
        (2, 1, 2.0, False),  # 2.5 mm > 2 mm
    ],
)
def test_shifted_sphere_nsd(axis, shift, tolerance, expect_one):
    spacing = (0.8, 0.8, 2.5)
    gt = sphere((40, 40, 16), (20, 20, 8), 10.0, spacing)
    pred = np.roll(gt, shift, axis=axis)
    nsd = surface_dice(gt, pred, spacing, tolerance)
    assert nsd == reference_surface_dice(gt, pred, spacing, tolerance)
    if expect_one:
        assert nsd == 1.0
    else:
        assert nsd == pytest.approx(DEEPMIND_SHIFTED_NSD[axis, shift, tolerance], rel=1e-12)
        assert nsd < 1.0
    assert surface_dice(gt, gt, spacing, tolerance) == 1.0


def test_crop_with_edges_inside_and_on_the_volume_matches_whole_volume():
    spacing = (0.9, 1.2, 2.0)
    rng = np.random.default_rng(2)
    gt = ndimage.binary_dilation(rng.random((30, 26, 14)) < 0.01, iterations=2)
    gt[:, :, 0] |= gt[:, :, 1]  # touches the volume's low and high z faces
    gt[:, :, -1] |= gt[:, :, -2]
    pred = np.roll(gt, (1, -1, 0), axis=(0, 1, 2))
    pred[:3] = False
    whole = reference_surface_dice(gt, pred, spacing, 2.0)
    box = ndimage.find_objects((gt | pred).view(np.uint8))[0]
    for grow in (0, 1, 3):  # box edges cut through the volume or sit on its faces
        crop = tuple(slice(max(s.start - grow, 0), s.stop + grow) for s in box)
        assert surface_dice(gt[crop], pred[crop], spacing, 2.0) == whole


def test_empty_masks():
    empty = np.zeros((5, 5, 5), bool)
    full = empty.copy()
    full[1:3, 1:3, 1:3] = True
    assert math.isnan(surface_dice(empty, empty, (1, 1, 1), 2.0))
    assert surface_dice(full, empty, (1, 1, 1), 2.0) == 0.0
    assert surface_dice(empty, full, (1, 1, 1), 2.0) == 0.0
