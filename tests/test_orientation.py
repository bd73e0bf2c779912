"""flare_rt.orientation against SimpleITK's DICOMOrient: every axis-aligned direction, several targets."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import SimpleITK as sitk

from flare_rt.errors import ConfigError
from flare_rt.orientation import (
    Reorientation,
    axial_code,
    effective_code,
    orientation_code,
    plan_reorientation,
    validate_code,
)

TARGETS = ["LPS", "RAS", "RAI", "LAS", "SPL", "AIR", "PSL", "ILA"]
SPACING = (0.7, 1.1, 2.5)  # x, y, z: distinct, so a wrong permutation of the spacing shows


def axis_aligned_directions():
    """All 48 signed permutation matrices (SimpleITK row-major, columns = index axes)."""
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1, -1), repeat=3):
            d = np.zeros((3, 3))
            for j, (p, s) in enumerate(zip(perm, signs)):
                d[p, j] = s
            yield pytest.param(tuple(d.ravel()), id=f"p{''.join(map(str, perm))}s{''.join('+' if s > 0 else '-' for s in signs)}")


DIRECTIONS = list(axis_aligned_directions())
assert len(DIRECTIONS) == 48


@pytest.fixture(scope="module")
def array() -> np.ndarray:
    # distinct sizes and values along every axis: any wrong permutation or flip changes the result
    return np.arange(3 * 4 * 5, dtype=np.int16).reshape(3, 4, 5)


def image_of(array: np.ndarray, direction) -> "sitk.Image":
    img = sitk.GetImageFromArray(array)
    img.SetDirection(direction)
    img.SetSpacing(SPACING)
    img.SetOrigin((10.0, -20.0, 30.0))
    return img


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_plan_matches_dicom_orient(array, direction):
    img = image_of(array, direction)
    for target in TARGETS:
        oriented = sitk.DICOMOrient(img, target)
        plan = plan_reorientation(direction, target)
        got = plan.apply(array)
        expected = sitk.GetArrayFromImage(oriented)
        assert got.shape == expected.shape, target
        np.testing.assert_array_equal(got, expected, err_msg=f"{target}: {plan}")
        # spacing in (z, y, x) order follows the permutation
        assert plan.spacing(tuple(reversed(SPACING))) == tuple(reversed(oriented.GetSpacing()))
        # the reoriented image really points as the target says
        assert orientation_code(oriented.GetDirection()) == target
        np.testing.assert_array_equal(plan.invert(got), array)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_code_matches_itk(direction):
    assert orientation_code(direction) == sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(direction)


@pytest.mark.parametrize("direction", DIRECTIONS[::7])
def test_plan_to_own_code_is_identity(array, direction):
    plan = plan_reorientation(direction, orientation_code(direction))
    assert plan.identity
    np.testing.assert_array_equal(plan.apply(array), array)


def test_invert_roundtrip_on_labels_and_views():
    """invert(apply(a)) == a for every signed permutation, and apply returns views (no copy)."""
    a = np.random.default_rng(0).integers(0, 15, (6, 7, 8)).astype(np.uint8)
    for perm in itertools.permutations(range(3)):
        for n in range(4):
            for flips in itertools.combinations(range(3), n):
                r = Reorientation(perm, flips)
                out = r.apply(a)
                assert out.shape == tuple(a.shape[p] for p in perm)
                assert np.shares_memory(out, a)
                np.testing.assert_array_equal(r.invert(out), a)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_none_is_axial_order_by_permutation_only(array, direction):
    """"none": whatever the stored axes, the array ends in axial order (index x left-right, y anterior-
    posterior, z superior-inferior), every axis keeping its stored sense; an axial image is left as stored.
    "stored" never moves anything."""
    code = orientation_code(direction)
    target = effective_code(direction, "none")
    assert [c in pair for c, pair in zip(target, ("LR", "PA", "SI"))] == [True] * 3
    assert sorted(target) == sorted(code)  # the same senses: a permutation, never a flip
    plan = plan_reorientation(direction, "none")
    assert plan.flips == ()
    assert plan.identity == (code == target)
    expected = sitk.GetArrayFromImage(sitk.DICOMOrient(image_of(array, direction), target))
    np.testing.assert_array_equal(plan.apply(array), expected)
    assert plan_reorientation(direction, "stored").identity
    assert effective_code(direction, "stored") == code and effective_code(direction, "LPS") == "LPS"


def test_none_turns_an_in_plane_transpose_back():
    """Index x along anterior, y along left (a 90-degree in-plane turn): x and y swap back, nothing flips."""
    plan = plan_reorientation((0, 1, 0, -1, 0, 0, 0, 0, 1), "none")
    assert plan == Reorientation((0, 2, 1), ())
    assert axial_code((0, 1, 0, -1, 0, 0, 0, 0, 1)) == "LAS"


@pytest.mark.parametrize("degrees", [-40, -10, 25, 44])
def test_none_leaves_an_oblique_axial_image_as_stored(degrees):
    d = rotation("z", degrees) @ rotation("x", 15) @ np.diag([-1.0, -1.0, 1.0])
    assert plan_reorientation(tuple(d.ravel()), "none").identity


def rotation(axis: str, degrees: float) -> np.ndarray:
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return {"x": np.array([[1, 0, 0], [0, c, -s], [0, s, c]]),
            "y": np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]]),
            "z": np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])}[axis]


@pytest.mark.parametrize("base, code", [((1, 1, 1), "LPS"), ((-1, -1, 1), "RAS"), ((1, -1, -1), "LAI")])
@pytest.mark.parametrize("axis", ["x", "y", "z"])
@pytest.mark.parametrize("degrees", [-40, -20, 5, 20, 40])
def test_oblique_closest_code(base, code, axis, degrees):
    """Rotations under 45 degrees keep the closest axis-aligned code."""
    d = rotation(axis, degrees) @ np.diag(base).astype(float)
    assert orientation_code(d.ravel()) == code
    assert orientation_code(d.ravel()) == sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(
        tuple(d.ravel()))


def test_oblique_past_45_degrees_changes_code():
    d = rotation("z", 60) @ np.eye(3)  # x index axis now mostly along physical y
    assert orientation_code(d.ravel()) == "PRS"


def test_oblique_matches_itk_random_rotations():
    rng = np.random.default_rng(1)
    for _ in range(300):
        q = rng.normal(size=4)
        w, x, y, z = q / np.linalg.norm(q)
        r = np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                      [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                      [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])
        if rng.random() < 0.5:
            r = r @ np.diag([1.0, 1.0, -1.0])  # improper (left-handed) directions too
        expected = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(tuple(r.ravel()))
        assert orientation_code(r.ravel()) == expected


def test_oblique_plan_matches_dicom_orient(array):
    """DICOMOrient permutes/flips by the closest code; so does the plan, for an oblique image too."""
    d = rotation("z", 25) @ rotation("x", -15) @ np.diag([-1.0, 1.0, -1.0])
    img = image_of(array, tuple(d.ravel()))
    for target in TARGETS:
        expected = sitk.GetArrayFromImage(sitk.DICOMOrient(img, target))
        np.testing.assert_array_equal(plan_reorientation(tuple(d.ravel()), target).apply(array), expected)


@pytest.mark.parametrize("code, expected", [("LPS", "LPS"), ("ras", "RAS"), ("Ail", "AIL"), ("none", "none"),
                                            ("NONE", "none"), ("None", "none"), ("stored", "stored"),
                                            ("STORED", "stored")])
def test_validate_code_accepts(code, expected):
    assert validate_code(code) == expected


@pytest.mark.parametrize("code", ["", "LP", "LPSR", "LLS", "LRS", "PAS", "SIL", "XYZ", "LP5", "nan"])
def test_validate_code_rejects(code):
    with pytest.raises(ConfigError) as info:
        validate_code(code)
    msg = str(info.value)
    assert repr(code.upper()) in msg  # names the bad value
    assert "LPS" in msg and "none" in msg and "stored" in msg  # and what is expected
    assert info.value.exit_code == 6
