"""Benchmark cases: real CTs from the shared data folder ($FLARE_RT_DATA, default ../shared/data), and the 512×512×269 timing case built from one.

``ts269`` follows the data folder's README.md: ``ts_example_ct.nii.gz`` resampled to
0.78125×0.78125×1.25 mm on a 512×512×269 grid centred on the scan (SimpleITK B-spline, default
pixel -1024, int16). It is built once into the cache folder and reused.

The build uses nibabel and numpy only (:func:`build_ts269`), so it also runs where SimpleITK is not
installed (the GPU test machine), and reproduces ``sitk.Resample(img, size, Transform(),
sitkBSpline, origin, spacing, direction, -1024, sitkInt16)`` voxel for voxel
(tests/bench/test_bench_cases.py compares the two): cubic B-spline interpolation of the
mirror-extended image (ITK's ``BSplineInterpolateImageFunction``), -1024 where the sample point lies
outside the image's half-voxel-extended box (ITK's ``IsInsideBuffer``), truncation toward zero to
int16. The grid keeps the scan's axes, so the interpolation is separable: one small dense matrix per
axis applied to the B-spline coefficients.
"""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import benchpath  # noqa: E402,F401  (run as a script: the checkout's flare_rt)
from typing import Callable

from flare_rt.resources import shared_data_dir

log = logging.getLogger("bench.cases")

DATA = shared_data_dir()

TS269_SIZE = (512, 512, 269)  # x, y, z (SimpleITK order)
TS269_SPACING = (0.78125, 0.78125, 1.25)  # mm
TS269_DEFAULT_HU = -1024


@dataclass(frozen=True)
class Case:
    name: str
    description: str
    locate: Callable[[Path], Path]  # cache dir -> image path (building it if needed)


def centred_grid_affine(affine, in_size, size, spacing):
    """Voxel-to-world affine of a grid of ``size`` voxels of ``spacing`` mm with the axes of ``affine`` (a
    NIfTI image's), centred on that image (centres at continuous index (size - 1) / 2 coincide)."""
    import numpy as np

    affine = np.asarray(affine, dtype=np.float64)
    in_spacing = np.linalg.norm(affine[:3, :3], axis=0)
    axes = affine[:3, :3] / in_spacing
    centre = affine[:3, :3] @ ((np.asarray(in_size) - 1) / 2) + affine[:3, 3]
    out = np.eye(4)
    out[:3, :3] = axes * np.asarray(spacing, dtype=np.float64)
    out[:3, 3] = centre - out[:3, :3] @ ((np.asarray(size) - 1) / 2)
    return out


def cubic_bspline(t):
    """The centred cubic B-spline basis function."""
    import numpy as np

    t = np.abs(t)
    return np.where(t < 1, 2 / 3 - t**2 + t**3 / 2, np.where(t < 2, (2 - t) ** 3 / 6, 0.0))


def bspline_matrix(coords, n: int):
    """Dense (len(coords), n) matrix evaluating a cubic B-spline with ``n`` coefficients at ``coords``
    (continuous indices), the coefficients mirror-extended (d c b | a b c d | c b a, ITK's and
    ``scipy.ndimage``'s ``mirror``); and which coords lie inside [-0.5, n - 0.5]."""
    import numpy as np

    coords = np.asarray(coords, dtype=np.float64)
    w = np.zeros((len(coords), n))
    rows = np.arange(len(coords))
    base = np.floor(coords).astype(np.int64)
    period = max(2 * (n - 1), 1)
    for k in range(-1, 3):
        idx = base + k
        mirrored = np.abs(idx) % period
        mirrored = np.where(mirrored > n - 1, period - mirrored, mirrored) if n > 1 else np.zeros_like(idx)
        np.add.at(w, (rows, mirrored), cubic_bspline(coords - idx))
    return w, (coords >= -0.5) & (coords <= n - 0.5)


def resample_bspline_axis_aligned(data, affine, out_affine, size, fill: float):
    """Cubic B-spline resampling of ``data`` (voxel-to-world ``affine``) onto ``size`` voxels of
    ``out_affine``, as ITK's Resample with a B-spline interpolator; float64. The two grids must share
    their axes (the index mapping is a per-axis scale and shift)."""
    import numpy as np
    import scipy.ndimage as ndi

    m = np.linalg.inv(np.asarray(affine, dtype=np.float64)) @ out_affine
    if not np.allclose(m[:3, :3], np.diag(np.diag(m[:3, :3])), atol=1e-9):
        raise ValueError("the output grid must keep the input's axes (separable resampling); got index map "
                         f"{np.round(m[:3, :3], 6).tolist()}")
    coef = ndi.spline_filter(np.asarray(data, dtype=np.float64), order=3, mode="mirror", output=np.float64)
    mats, inside = zip(*(bspline_matrix(m[a, a] * np.arange(size[a]) + m[a, 3], data.shape[a]) for a in range(3)))
    out = np.einsum("ia,abc->ibc", mats[0], coef, optimize=True)
    out = np.einsum("jb,ibc->ijc", mats[1], out, optimize=True)
    out = np.einsum("kc,ijc->ijk", mats[2], out, optimize=True)
    out[~inside[0]] = fill
    out[:, ~inside[1]] = fill
    out[:, :, ~inside[2]] = fill
    return out


def build_ts269(src: Path, dst: Path, size=TS269_SIZE, spacing=TS269_SPACING) -> Path:
    """Resample ``src`` onto the timing grid (``size`` voxels x, y, z of ``spacing`` mm, centred on the
    scan, the scan's axes); write int16 (truncated toward zero, as ITK casts) to ``dst``."""
    import nibabel as nib
    import numpy as np

    from flare_rt.atomic import atomic_path

    img = nib.load(str(src))
    if len(img.shape) != 3:
        raise ValueError(f"{src}: expected a 3D image, got shape {img.shape}")
    out_affine = centred_grid_affine(img.affine, img.shape, size, spacing)
    values = resample_bspline_axis_aligned(np.asarray(img.dataobj), img.affine, out_affine, size, TS269_DEFAULT_HU)
    info = np.iinfo(np.int16)
    out = nib.Nifti1Image(np.clip(np.trunc(values), info.min, info.max).astype(np.int16), out_affine)
    out.header.set_xyzt_units("mm", "sec")
    out.set_qform(out_affine, code=1)
    out.set_sform(out_affine, code=1)
    with atomic_path(dst) as tmp:
        nib.save(out, str(tmp))
    log.info("built %s: size %s, spacing %s", dst, tuple(size), tuple(spacing))
    return dst


SMALL_SLICES = (82, 112)  # z range of ts_example_ct_sm.nii.gz in ts_example_ct.nii.gz
SMALL_CLIP = (-1100, 1207)


def build_small(src: Path, dst: Path) -> Path:
    """``ts_example_ct_sm.nii.gz`` of the shared data folder rebuilt from the full example CT: slices 82–111,
    clipped to [-1100, 1207], int16, with the full scan's affine (so it does not overlap it in space),
    for machines without the shared folder (the GPU check)."""
    import nibabel as nib
    import numpy as np

    from flare_rt.atomic import atomic_path

    img = nib.load(str(src))
    data = np.asarray(img.dataobj)[:, :, slice(*SMALL_SLICES)]
    out = nib.Nifti1Image(np.clip(data, *SMALL_CLIP).astype(np.int16), img.affine)
    out.set_qform(None, code=0)
    out.set_sform(img.affine, code=2)
    with atomic_path(dst) as tmp:
        nib.save(out, str(tmp))
    return dst


def _ts269(cache: Path) -> Path:
    dst = cache / "ts269_ct.nii.gz"
    if dst.is_file():
        got = tuple(image_info(dst)["size_xyz"])
        if got == TS269_SIZE:
            return dst
        log.warning("%s has size %s, expected %s: rebuilding", dst, got, TS269_SIZE)
    log.info("building the 512x512x269 timing case from ts_example_ct.nii.gz (once)")
    return build_ts269(DATA / "ts_example_ct.nii.gz", dst)


def _file(name: str) -> Callable[[Path], Path]:
    def locate(cache: Path) -> Path:
        path = DATA / name
        if not path.is_file():
            raise FileNotFoundError(f"{path}: benchmark input missing (set FLARE_RT_DATA to the data folder)")
        return path

    return locate


CASES: dict[str, Case] = {
    "ircad01": Case("ircad01", "3D-IRCADb-01 patient 1, 512×512×129, 0.57×0.57×1.6 mm", _file("ircad01_ct.nii.gz")),
    "ts269": Case("ts269", "ts_example_ct resampled to 512×512×269, 0.78×0.78×1.25 mm", _ts269),
    "small": Case("small", "ts_example_ct_sm, 122×101×30, 3 mm (quick validation)", _file("ts_example_ct_sm.nii.gz")),
}
DEFAULT_CASES = ("ircad01", "ts269")


def image_info(path: Path) -> dict:
    """Size, spacing and pixel type from the NIfTI header (nibabel: no SimpleITK needed)."""
    import nibabel as nib

    img = nib.load(str(path))
    return {"path": str(path), "size_xyz": [int(n) for n in img.shape[:3]],
            "spacing_xyz": [round(float(s), 5) for s in img.header.get_zooms()[:3]],
            "pixel_type": str(img.get_data_dtype())}


def main(argv=None) -> int:
    """``python bench/cases.py data DIR``: a data folder for machines without ../shared/data (the GPU check):
    the example CT and its 30-slice crop (``ts_example_ct_sm.nii.gz``)."""
    import argparse
    import shutil

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("what", choices=["data"])
    p.add_argument("dir", type=Path)
    p.add_argument("--src", type=Path, default=Path(__file__).resolve().parents[1] / "examples" / "ts_example_ct.nii.gz")
    args = p.parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
    full = args.dir / "ts_example_ct.nii.gz"
    if not full.exists():
        shutil.copyfile(args.src, full)
    build_small(full, args.dir / "ts_example_ct_sm.nii.gz")
    print(f"{args.dir}: ts_example_ct.nii.gz, ts_example_ct_sm.nii.gz")
    return 0


if __name__ == "__main__":
    sys.exit(main())
