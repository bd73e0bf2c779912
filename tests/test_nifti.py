"""NIfTI without SimpleITK (flare_rt.nifti): the same voxels, pixel type, geometry, validation errors and
written bytes as SimpleITK, on the real CTs and on headers built to exercise each of ITK's rules.

Reading is compared with ``SimpleITK.ReadImage`` exactly (arrays, dtypes, size, spacing, origin and the
direction cosines to the last bit); writing is compared byte for byte after decompression with
``SimpleITK.WriteImage`` (gzip streams differ: ITK's zlib-ng deflates differently). Bit-exactness of
the float arithmetic is asserted on x86-64, where neither C nor numpy fuses multiply-adds; elsewhere
to the float32 rounding of the header fields. The CLI runs in a subprocess with ``import SimpleITK``
made to fail, and must write the very file the SimpleITK path writes.
"""
from __future__ import annotations

import gzip
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from flare_rt.errors import InputImageError
from flare_rt.geometry import Geometry
from flare_rt.io import IMAGE_IO_ENV, load_volume, write_labels
from flare_rt.nifti import read_nifti, write_nifti

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_CT = REPO / "examples" / "ts_example_ct.nii.gz"
X86 = platform.machine().lower() in ("x86_64", "amd64")

#: Prepended to ``python -c`` code: any ``import SimpleITK`` fails, as on a machine without it.
HIDE_SIMPLEITK = """\
import sys
class _NoSimpleITK:
    def find_spec(self, name, path=None, target=None):
        if name == "SimpleITK" or name.startswith("SimpleITK."):
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)", name=name)
        return None
sys.meta_path.insert(0, _NoSimpleITK())
"""


def run_python(code: str, *args, hide_simpleitk: bool = True) -> subprocess.CompletedProcess:
    """``python -c code args...`` in the repository (``sys`` imported), by default with SimpleITK hidden, with
    the automatic choice of NIfTI reader; fails the test on a non-zero exit."""
    env = {k: v for k, v in os.environ.items() if k != IMAGE_IO_ENV}
    code = (HIDE_SIMPLEITK if hide_simpleitk else "import sys\n") + code
    proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture
def io_mode(monkeypatch):
    """``io_mode("nibabel")`` / ``io_mode("simpleitk")``: who reads and writes NIfTI in this process."""
    return lambda mode: monkeypatch.setenv(IMAGE_IO_ENV, mode)


# -- a corpus of NIfTI files ---------------------------------------------------------------------------------
def ct_block() -> np.ndarray:
    """A 40x36x20 (x, y, z) block of the example CT with air and body (int32 HU)."""
    return np.asarray(nib.load(str(EXAMPLE_CT)).dataobj)[20:60, 10:46, 40:60].astype(np.int32)


def rotation(ax: float, ay: float, az: float) -> np.ndarray:
    cx, cy, cz, sx, sy, sz = np.cos(ax), np.cos(ay), np.cos(az), np.sin(ax), np.sin(ay), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def affine(rot, zooms, offset) -> np.ndarray:
    a = np.eye(4)
    a[:3, :3] = np.asarray(rot) * np.asarray(zooms)
    a[:3, 3] = offset
    return a


BLOCK = (40, 36, 20)  # shape of ct_block()
OBLIQUE = affine(rotation(0.3, -0.2, 0.9), (0.8, 0.8, 2.5), (-120.5, 80.25, -300.0))
LEFT_HANDED = affine(rotation(0.1, 0.0, -0.4) @ np.diag([1, 1, -1]), (0.7, 0.9, 3.0), (10, 20, 30))
SHEARED = np.array([[0.8, 0.3, 0.0, -10], [0.0, 0.8, 0.0, 5], [0.0, 0.0, 2.5, 40], [0, 0, 0, 1.0]])
FLIP_XY = affine(np.diag([-1, -1, 1]), (3, 3, 3), (177.9, 11.3, 94.3))  # a 180 degree quaternion


def write_raw(path: Path, hdr: nib.Nifti1Header, data_xyz: np.ndarray, extension: bytes = b"\0\0\0\0") -> Path:
    """Header bytes as given (no nibabel clean-up), the extension block, the voxels in the header's type."""
    body = hdr.binaryblock + extension + np.asarray(data_xyz).astype(hdr.get_data_dtype()).tobytes(order="F")
    if path.name.endswith(".gz"):
        with gzip.open(path, "wb", compresslevel=1) as fh:
            fh.write(body)
    else:
        path.write_bytes(body)
    return path


def nib_header(shape, dtype=np.int16, qform=None, sform=None, **fields) -> nib.Nifti1Header:
    """``qform``/``sform``: (affine, code) or None (code 0, as nibabel's set_qform/set_sform store them);
    ``fields``: header fields set last, as given."""
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(dtype)
    hdr.set_data_shape(shape)
    hdr["qform_code"] = hdr["sform_code"] = 0
    if qform is not None:
        hdr.set_qform(qform[0], code=int(qform[1]))
    if sform is not None:
        hdr.set_sform(sform[0], code=int(sform[1]))
    hdr["xyzt_units"], hdr["scl_slope"], hdr["scl_inter"], hdr["vox_offset"] = 10, 1.0, 0.0, 352
    for key, value in fields.items():
        hdr[key] = value
    return hdr


def make_nifti(path: Path, data_xyz=None, dtype=np.int16, shape=None, **header) -> Path:
    """A NIfTI-1 file of ``data_xyz`` (default: the CT block), header as :func:`nib_header` makes it."""
    data = ct_block() if data_xyz is None else np.asarray(data_xyz)
    return write_raw(path, nib_header(data.shape if shape is None else shape, dtype, **header), data)


def sitk_block() -> sitk.Image:
    """The CT block as SimpleITK reads it from the example CT (int32, direction diag(-1, -1, 1))."""
    return sitk.ReadImage(str(EXAMPLE_CT))[20:60, 10:46, 40:60]


def sitk_copy(path: Path, image: sitk.Image) -> Path:
    sitk.WriteImage(image, str(path))
    return path


GEOMETRY_CASES = {
    # SimpleITK-written (qform and sform codes 1): how most pipelines write
    "sitk_example_crop": lambda d: sitk_copy(d / "a.nii.gz", sitk_block()),
    "sitk_permuted": lambda d: sitk_copy(d / "a.nii.gz", sitk.PermuteAxes(sitk_block(), [2, 0, 1])),
    "sitk_flipped": lambda d: sitk_copy(d / "a.nii", sitk.Flip(sitk_block(), [True, False, True])),
    "sitk_oblique": lambda d: sitk_copy(d / "a.nii.gz", oblique_sitk_image()),
    # nibabel-style headers: every combination of the two transforms and their codes
    "sform_aligned_only": lambda d: make_nifti(d / "a.nii.gz", sform=(OBLIQUE, 2)),
    "sform_scanner_only": lambda d: make_nifti(d / "a.nii.gz", sform=(OBLIQUE, 1)),
    "qform_only": lambda d: make_nifti(d / "a.nii.gz", qform=(OBLIQUE, 1)),
    "qform_only_180": lambda d: make_nifti(d / "a.nii.gz", qform=(FLIP_XY, 1)),
    "qform_left_handed": lambda d: make_nifti(d / "a.nii.gz", qform=(LEFT_HANDED, 2)),
    "both_scanner": lambda d: make_nifti(d / "a.nii.gz", qform=(OBLIQUE, 1), sform=(OBLIQUE, 1)),
    "both_aligned": lambda d: make_nifti(d / "a.nii.gz", qform=(OBLIQUE, 2), sform=(OBLIQUE, 2)),
    "q_scanner_s_mni": lambda d: make_nifti(d / "a.nii.gz", qform=(OBLIQUE, 1), sform=(OBLIQUE, 4)),
    "q_and_s_differ": lambda d: make_nifti(d / "a.nii.gz", qform=(OBLIQUE, 1), sform=(LEFT_HANDED, 2)),
    "sheared_sform_with_qform": lambda d: make_nifti(d / "a.nii.gz", qform=(SHEARED, 1), sform=(SHEARED, 1)),
    "left_handed_both": lambda d: make_nifti(d / "a.nii.gz", qform=(LEFT_HANDED, 1), sform=(LEFT_HANDED, 1)),
    "no_transform": lambda d: make_nifti(d / "a.nii.gz"),
    # header fields ITK reads in its own way
    "units_meter": lambda d: make_nifti(d / "a.nii.gz", sform=(OBLIQUE * [[1e-3], [1e-3], [1e-3], [1]], 1),
                                        xyzt_units=1),
    "units_micron": lambda d: make_nifti(d / "a.nii.gz", qform=(OBLIQUE, 1), xyzt_units=3),
    "negative_pixdim": lambda d: make_nifti(d / "a.nii.gz", sform=(OBLIQUE, 2), pixdim=[1, -0.8, 0.8, 2.5, 1, 1, 1, 1]),
    "zero_pixdim": lambda d: make_nifti(d / "a.nii.gz", qform=(OBLIQUE, 1), pixdim=[1, 0, 0.8, 2.5, 1, 1, 1, 1]),
    "big_endian": lambda d: write_raw(d / "a.nii.gz", nib_header(BLOCK, qform=(OBLIQUE, 1), sform=(OBLIQUE, 1))
                                      .as_byteswapped(">"), ct_block()),
    "extension_block": lambda d: write_raw(d / "a.nii", nib_header(BLOCK, sform=(OBLIQUE, 1), vox_offset=352 + 32),
                                           ct_block(), extension=b"\1\0\0\0" + (32).to_bytes(4, "little")
                                           + (6).to_bytes(4, "little") + b"x" * 24),
    "vox_offset_zero": lambda d: make_nifti(d / "a.nii.gz", sform=(OBLIQUE, 1), vox_offset=0,
                                            data_xyz=np.concatenate([[0], ct_block().ravel(order="F")])[1:]
                                            .reshape(ct_block().shape, order="F")),
    "ni1_magic_single_file": lambda d: make_nifti(d / "a.nii", sform=(OBLIQUE, 1), magic=b"ni1"),
    "4d_with_one_volume": lambda d: make_nifti(d / "a.nii.gz", sform=(OBLIQUE, 1), data_xyz=ct_block()[..., None],
                                               shape=ct_block().shape + (1,)),
}


def oblique_sitk_image() -> sitk.Image:
    img = sitk.GetImageFromArray(np.ascontiguousarray(ct_block().transpose(2, 1, 0)).astype(np.int16))
    img.SetSpacing((0.8, 0.8, 2.5))
    img.SetOrigin((120.5, -80.25, -300.0))
    img.SetDirection(tuple((np.diag([-1, -1, 1]) @ rotation(0.3, -0.2, 0.9)).ravel()))
    return img


def sitk_view(path: Path) -> tuple:
    img = sitk.ReadImage(str(path))
    return (sitk.GetArrayFromImage(img), img.GetSize(), img.GetNumberOfComponentsPerPixel(),
            img.GetPixelIDTypeAsString(), Geometry.of(img) if img.GetDimension() == 3 else None)


def assert_reads_like_sitk(path: Path) -> None:
    expected_array, size, components, pixel_type, geometry = sitk_view(path)
    got = read_nifti(path)
    assert (got.size, got.components, got.pixel_type) == (size, components, pixel_type)
    assert got.array.dtype == expected_array.dtype and got.array.shape == expected_array.shape
    np.testing.assert_array_equal(got.array, expected_array)
    if geometry is not None:
        if X86:  # bit for bit (signed zeros too)
            assert got.geometry.size == geometry.size
            for name in ("spacing", "origin", "direction"):
                assert np.array(getattr(got.geometry, name)).tobytes() == np.array(getattr(geometry, name)).tobytes()
        else:
            assert got.geometry.size == geometry.size
            for name in ("spacing", "origin", "direction"):
                np.testing.assert_allclose(getattr(got.geometry, name), getattr(geometry, name), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", sorted(GEOMETRY_CASES))
def test_geometry_and_voxels_match_simpleitk(tmp_path, case):
    assert_reads_like_sitk(GEOMETRY_CASES[case](tmp_path))


@pytest.mark.parametrize("name", ["ts_example_ct.nii.gz", "ircad01_ct.nii.gz", "ts_example_ct_sm.nii.gz",
                                  "ts_dicom_seg_flare.nii.gz", "ts_example_ct_sm_seg_flare.nii.gz"])
def test_real_files_match_simpleitk(shared_data, name):
    """The shared CTs and label maps: sform-only int32 (diag(-1,-1,1)), qform+sform int16 512x512, uint8."""
    assert_reads_like_sitk(shared_data / name)


def test_the_cases_take_different_branches(tmp_path):
    """The corpus is not degenerate: ITK's choices differ between cases (qform vs sform)."""
    directions = {}
    for case in ("qform_only", "sform_aligned_only", "q_and_s_differ"):
        (tmp_path / case).mkdir()
        directions[case] = read_nifti(GEOMETRY_CASES[case](tmp_path / case)).geometry.direction
    # qform and sform of the same oblique affine agree to float precision, but not bit for bit
    assert directions["qform_only"] != directions["sform_aligned_only"]
    np.testing.assert_allclose(directions["qform_only"], directions["sform_aligned_only"], atol=1e-6)
    # two different transforms: ITK takes the qform (OBLIQUE), not the sform (LEFT_HANDED)
    np.testing.assert_allclose(directions["q_and_s_differ"], directions["qform_only"], atol=1e-12)


def test_sheared_sform_without_qform(tmp_path, monkeypatch):
    """ITK refuses a sheared sform without a qform (both readers say so); with ITK_NIFTI_SFORM_PERMISSIVE it
    orthogonalises it, and so does flare_rt.nifti."""
    path = make_nifti(tmp_path / "a.nii.gz", sform=(SHEARED, 1))
    with pytest.raises(RuntimeError, match="orthonormal"):
        sitk.ReadImage(str(path))
    with pytest.raises(InputImageError, match="cannot read image: .*sform is not an orthonormal grid"):
        read_nifti(path)
    monkeypatch.setenv("ITK_NIFTI_SFORM_PERMISSIVE", "1")
    assert_reads_like_sitk(path)


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.uint16, np.int32, np.uint32, np.int64,
                                   np.float32, np.float64])
@pytest.mark.parametrize("slope, inter", [(1.0, 0.0), (0.0, 0.0), (1.0, -1024.0), (0.37, 12.5), (np.nan, 3.0)])
def test_data_types_and_scaling_match_simpleitk(tmp_path, dtype, slope, inter):
    """Every scalar type, with and without scl_slope/scl_inter (ITK: ints become float32, slope 0 or NaN = 1)."""
    block = ct_block()
    if np.issubdtype(dtype, np.unsignedinteger):
        block = block - block.min()
    if np.dtype(dtype).itemsize == 1:
        block = block // 16
    path = make_nifti(tmp_path / "a.nii.gz", data_xyz=block, dtype=dtype, sform=(OBLIQUE, 1),
                      scl_slope=slope, scl_inter=inter)
    assert_reads_like_sitk(path)


def test_non_finite_voxels_read_like_simpleitk_elsewhere(tmp_path):
    """ITK's reader turns NaN/inf into 0, flare_rt.nifti keeps them (so the loader can report them); every
    other voxel is identical."""
    block = ct_block().astype(np.float32)
    block[3, 4, 5], block[6, 7, 8] = np.nan, np.inf
    path = make_nifti(tmp_path / "a.nii.gz", data_xyz=block, dtype=np.float32, qform=(OBLIQUE, 1))
    got, expected = read_nifti(path).array, sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    assert np.isnan(got[5, 4, 3]) and np.isinf(got[8, 7, 6]) and expected[5, 4, 3] == expected[8, 7, 6] == 0
    finite = np.isfinite(got)
    np.testing.assert_array_equal(got[finite], expected[finite])


# -- validation: the same error lines ---------------------------------------------------------------------------
RGB = np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")])


def _ct_like(block):  # a float CT with a NaN
    block = block.astype(np.float32)
    block[1, 2, 3] = np.nan
    return block


VALIDATION_CASES = {
    "nan": lambda d: make_nifti(d / "a.nii.gz", data_xyz=_ct_like(ct_block()), dtype=np.float32, sform=(OBLIQUE, 1)),
    "inf_4d": lambda d: make_nifti(d / "a.nii.gz", data_xyz=np.stack([_ct_like(ct_block())] * 2, -1),
                                   dtype=np.float64, sform=(OBLIQUE, 1)),
    "2d": lambda d: make_nifti(d / "a.nii.gz", data_xyz=ct_block()[:, :, 5], sform=(OBLIQUE, 1)),
    "4d": lambda d: make_nifti(d / "a.nii.gz", data_xyz=np.stack([ct_block()] * 3, -1), sform=(OBLIQUE, 1)),
    "single_slice": lambda d: make_nifti(d / "a.nii.gz", data_xyz=ct_block()[:, :, 4:5], sform=(OBLIQUE, 1)),
    "not_ct": lambda d: make_nifti(d / "a.nii.gz", data_xyz=ct_block() + 1100, sform=(OBLIQUE, 1)),
    "scaled_not_ct": lambda d: make_nifti(d / "a.nii.gz", sform=(OBLIQUE, 1), scl_slope=0.01, scl_inter=100),
    "rgb": lambda d: write_raw(d / "a.nii.gz", nib_header(BLOCK, RGB, sform=(OBLIQUE, 1)), np.zeros(BLOCK, RGB)),
    "complex": lambda d: make_nifti(d / "a.nii.gz", data_xyz=ct_block().astype(np.complex64), dtype=np.complex64,
                                    sform=(OBLIQUE, 1)),
    "vector": lambda d: make_nifti(d / "a.nii.gz", data_xyz=np.stack([ct_block()] * 3, -1)[..., None, :],
                                   shape=ct_block().shape + (1, 3), sform=(OBLIQUE, 1), intent_code=1007),
    "empty": lambda d: written(d / "a.nii.gz", b""),
    "missing": lambda d: d / "absent.nii.gz",
    "truncated_gzip": lambda d: truncated(make_nifti(d / "a.nii.gz", sform=(OBLIQUE, 1))),
    "not_gzip": lambda d: written(d / "a.nii.gz", b"plain text, not gzip" * 50),
    "not_nifti": lambda d: written(d / "a.nii", b"\0\1\2\3" * 200),
}


def written(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def truncated(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.mark.parametrize("case", sorted(VALIDATION_CASES))
def test_validation_errors_are_the_same_lines(tmp_path, io_mode, case):
    path = VALIDATION_CASES[case](tmp_path)
    lines = {}
    for mode in ("simpleitk", "nibabel"):
        io_mode(mode)
        with pytest.raises(InputImageError) as err:
            load_volume(path)
        lines[mode] = str(err.value)
    assert lines["nibabel"] == lines["simpleitk"]
    assert lines["nibabel"].startswith(f"{path}: ")


def test_nifti2_is_refused_by_both(tmp_path, io_mode):
    """Neither reader reads NIfTI-2; both say "cannot read image" (ITK's reason vs ours, in our words)."""
    path = tmp_path / "a.nii.gz"
    nib.save(nib.Nifti2Image(ct_block().astype(np.int16), OBLIQUE), str(path))
    for mode in ("simpleitk", "nibabel"):
        io_mode(mode)
        with pytest.raises(InputImageError, match=f"^{path}: cannot read image"):
            load_volume(path)


def test_analyze_and_two_file_headers_name_simpleitk(tmp_path):
    """What only SimpleITK reads (ANALYZE 7.5, a .hdr/.img pair) is refused with the package to install."""
    analyze = make_nifti(tmp_path / "a.nii", sform=(OBLIQUE, 1), magic=b"")
    pair = make_nifti(tmp_path / "b.nii", sform=(OBLIQUE, 1), magic=b"ni1")
    (tmp_path / "b.img").write_bytes(b"")
    for path, what in ((analyze, "ANALYZE 7.5"), (pair, "two-file NIfTI")):
        with pytest.raises(InputImageError, match=f"{what}.*pip install SimpleITK"):
            read_nifti(path)


def test_forced_reading_gives_the_same_volume(tmp_path, io_mode):
    path = VALIDATION_CASES["not_ct"](tmp_path)
    volumes = []
    for mode in ("simpleitk", "nibabel"):
        io_mode(mode)
        volumes.append(load_volume(path, force=True))
    assert volumes[0].geometry == volumes[1].geometry and volumes[0].spacing == volumes[1].spacing
    np.testing.assert_array_equal(volumes[0].array, volumes[1].array)


@pytest.mark.parametrize("name", ["ts_example_ct.nii.gz", "ircad01_ct.nii.gz"])
def test_load_volume_is_the_same_on_real_cts(shared_data, io_mode, name):
    volumes = []
    for mode in ("simpleitk", "nibabel"):
        io_mode(mode)
        volumes.append(load_volume(shared_data / name))
    a, b = volumes
    assert a.array.dtype == b.array.dtype and a.geometry == b.geometry
    assert (a.spacing, a.direction) == (b.spacing, b.direction)
    np.testing.assert_array_equal(a.array, b.array)
    if name == "ts_example_ct.nii.gz":
        assert b.direction == (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0) and b.spacing == (3.0, 3.0, 3.0)


# -- writing: the bytes SimpleITK writes --------------------------------------------------------------------------
def random_geometries(n: int, seed: int = 0) -> list[Geometry]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        rot = rotation(*rng.uniform(-np.pi, np.pi, 3))
        if rng.random() < 0.5:
            rot = rot @ np.diag([1, 1, -1])  # left-handed
        out.append(Geometry(tuple(int(s) for s in rng.integers(2, 9, 3)), tuple(rng.uniform(0.3, 5.0, 3)),
                            tuple(rng.uniform(-400, 400, 3)), tuple(rot.ravel())))
    return out


def axis_aligned_geometries() -> list[Geometry]:
    """The 48 signed permutations of the axes, with real-CT-like spacing and origins."""
    import itertools

    out = []
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1, -1), repeat=3):
            d = np.zeros((3, 3))
            d[list(perm), range(3)] = signs
            out.append(Geometry((5, 6, 7), (0.7421875, 0.7421875, 2.5), (-189.62890625, -342.12890625, 1602.5),
                                tuple(d.ravel())))
    return out


def sitk_written(labels: np.ndarray, geometry: Geometry, path: Path) -> bytes:
    sitk.WriteImage(geometry.apply_to(sitk.GetImageFromArray(labels)), str(path), useCompression=True)
    return gzip.decompress(path.read_bytes())


def assert_same_file(ours: bytes, theirs: bytes) -> None:
    """Field by field (a readable failure), then every byte."""
    h1 = nib.Nifti1Header(ours[:348], check=False)
    h2 = nib.Nifti1Header(theirs[:348], check=False)
    for key in h2.keys():
        a, b = np.asarray(h1[key]), np.asarray(h2[key])
        if b.dtype.kind != "f":
            assert np.array_equal(a, b), (key, a, b)
        elif X86:  # bit for bit, signed zeros included
            assert a.tobytes() == b.tobytes(), (key, a, b)
        else:
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6, err_msg=key)
    assert len(ours) == len(theirs) and ours[352:] == theirs[352:]  # voxels
    if X86:
        assert ours == theirs


@pytest.mark.parametrize("kind", ["random_oblique", "axis_aligned"])
def test_written_header_is_simpleitks(tmp_path, kind):
    geometries = random_geometries(40) if kind == "random_oblique" else axis_aligned_geometries()
    rng = np.random.default_rng(1)
    for i, g in enumerate(geometries):
        labels = rng.integers(0, 14, g.shape).astype(np.uint8)
        ours = gzip.decompress(write_nifti(labels, g, tmp_path / f"ours{i}.nii.gz").read_bytes())
        assert_same_file(ours, sitk_written(labels, g, tmp_path / f"sitk{i}.nii.gz"))
        back = sitk.ReadImage(str(tmp_path / f"ours{i}.nii.gz"))
        assert back.GetSize() == g.size and back.GetPixelID() == sitk.sitkUInt8
        np.testing.assert_allclose(back.GetDirection(), g.direction, atol=1e-6)
        np.testing.assert_allclose(back.GetOrigin(), g.origin, atol=1e-4)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(back), labels)


@pytest.mark.parametrize("name", ["ts_example_ct.nii.gz", "ircad01_ct.nii.gz", "ts_dicom_seg_flare.nii.gz"])
def test_write_labels_is_the_same_file_both_ways(shared_data, tmp_path, io_mode, name):
    """write_labels with either writer: the same decompressed file, which both readers read back alike."""
    geometry = read_nifti(shared_data / name).geometry
    z, y, x = np.ogrid[: geometry.shape[0], : geometry.shape[1], : geometry.shape[2]]
    labels = ((x // 9 + y // 7 + z // 3) % 14).astype(np.uint8)  # every label, in blocks (quick to compress)
    files = {}
    for mode in ("simpleitk", "nibabel"):
        io_mode(mode)
        files[mode] = write_labels(labels, geometry, tmp_path / mode / "seg.nii.gz")
    assert_same_file(gzip.decompress(files["nibabel"].read_bytes()), gzip.decompress(files["simpleitk"].read_bytes()))
    for mode in ("simpleitk", "nibabel"):
        back = read_nifti(files[mode])
        assert back.geometry == Geometry.of(sitk.ReadImage(str(files[mode])))
        np.testing.assert_array_equal(back.array, labels)
    assert read_nifti(files["nibabel"]).geometry == read_nifti(files["simpleitk"]).geometry


# -- without SimpleITK --------------------------------------------------------------------------------------------
def test_runtime_modules_import_neither_simpleitk_nor_nibabel():
    """``import flare_rt`` and the modules of the runtime path import neither SimpleITK nor nibabel (they
    are imported when a file is read), and import without SimpleITK."""
    code = ("import flare_rt, flare_rt.io, flare_rt.nifti, flare_rt.geometry, flare_rt.pipeline, flare_rt.cli, "
            "flare_rt.statistics, flare_rt.preview, flare_rt.folder\n"
            "print(sorted(m for m in ('SimpleITK', 'nibabel') if m in sys.modules))")
    assert run_python(code, hide_simpleitk=False).stdout.strip() == "[]"
    assert run_python(code).stdout.strip() == "[]"


def test_segment_without_simpleitk_writes_the_same_file(tmp_path, small_ct_path):
    """``flare-rt segment`` with SimpleITK hidden (so NIfTI goes through nibabel) writes the file the SimpleITK
    path writes: every header field and voxel, every decompressed byte; and the same statistics."""
    args = ["--step", "1", "-q", "--statistics"]
    run_python("import runpy; sys.argv = ['flare-rt', 'segment', *sys.argv[1:]]\n"
               "runpy.run_module('flare_rt', run_name='__main__')", small_ct_path, tmp_path / "nib.nii.gz", *args)
    proc = subprocess.run([sys.executable, "-m", "flare_rt", "segment", small_ct_path, tmp_path / "sitk.nii.gz", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, IMAGE_IO_ENV: "simpleitk"})
    assert proc.returncode == 0, proc.stderr
    ours, theirs = (gzip.decompress((tmp_path / n).read_bytes()) for n in ("nib.nii.gz", "sitk.nii.gz"))
    assert_same_file(ours, theirs)
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "nib.nii.gz")))
    assert len(np.unique(labels)) >= 3  # a real segmentation, not an empty map
    stats = [json.loads((tmp_path / f"{n}_statistics.json").read_text()) for n in ("nib", "sitk")]
    assert [s.pop("case") for s in stats] == ["nib", "sitk"] and stats[0] == stats[1]


def test_without_simpleitk_other_formats_say_what_to_install(tmp_path, shared_data):
    mha = tmp_path / "ct.mha"
    sitk.WriteImage(sitk.ReadImage(str(EXAMPLE_CT)), str(mha))
    proc = run_python("from pathlib import Path\nimport numpy as np\n"
                      "from flare_rt.errors import InputImageError\n"
                      "from flare_rt.io import load_volume, write_labels\n"
                      "for src in sys.argv[1:3]:\n"
                      "    try:\n        load_volume(src)\n    except InputImageError as e:\n        print(e)\n"
                      "v = load_volume(sys.argv[3])\n"
                      "try:\n    write_labels(np.zeros(v.array.shape, np.uint8), v.geometry, Path(sys.argv[4]))\n"
                      "except InputImageError as e:\n    print(e)\n",
                      mha, shared_data / "ts_dicom", EXAMPLE_CT, tmp_path / "seg.nrrd")
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 3, proc.stdout
    for line, what in zip(lines, ["reading .mha images", "reading DICOM series", "writing .nrrd images"]):
        assert f"{what} needs SimpleITK" in line and "pip install SimpleITK" in line, line


def test_forcing_simpleitk_without_it_is_an_error_and_auto_falls_back():
    proc = run_python("from flare_rt.io import load_volume, nifti_io\nfrom flare_rt.errors import InputImageError\n"
                      "import os\nprint(nifti_io())\nos.environ['FLARE_RT_IMAGE_IO'] = 'simpleitk'\n"
                      "try:\n    load_volume(sys.argv[1])\nexcept InputImageError as e:\n    print(e)\n", EXAMPLE_CT)
    auto, forced = proc.stdout.strip().splitlines()
    assert auto == "nibabel" and "needs SimpleITK" in forced and "pip install SimpleITK" in forced


def test_bad_image_io_setting_is_a_config_error(io_mode):
    from flare_rt.errors import ConfigError

    io_mode("itk")
    with pytest.raises(ConfigError, match="FLARE_RT_IMAGE_IO='itk'"):
        load_volume(EXAMPLE_CT)
