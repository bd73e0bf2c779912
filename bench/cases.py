"""Benchmark cases: real CTs from the shared data folder ($FLARE_RT_DATA, default ../shared/data), and the 512×512×269 timing case built from one.

``ts269`` follows the data folder's README.md: ``ts_example_ct.nii.gz`` resampled to
0.78125×0.78125×1.25 mm on a 512×512×269 grid centred on the scan (SimpleITK B-spline, default
pixel -1024, int16). It is built once into the cache folder and reused.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
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


def build_ts269(src: Path, dst: Path) -> Path:
    """Resample ``src`` onto the 512×512×269 timing grid centred on the scan; write int16 to ``dst``."""
    import numpy as np
    import SimpleITK as sitk

    from flare_rt.atomic import atomic_path

    img = sitk.ReadImage(str(src))
    direction = np.array(img.GetDirection()).reshape(3, 3)
    # physical centre of the input: continuous index (size - 1) / 2
    centre = img.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in img.GetSize()])
    half_extent = np.array(TS269_SPACING) * (np.array(TS269_SIZE) - 1) / 2
    origin = np.array(centre) - direction @ half_extent
    out = sitk.Resample(img, list(TS269_SIZE), sitk.Transform(), sitk.sitkBSpline, origin.tolist(),
                        list(TS269_SPACING), img.GetDirection(), TS269_DEFAULT_HU, sitk.sitkInt16)
    with atomic_path(dst) as tmp:
        sitk.WriteImage(out, str(tmp), useCompression=True)
    log.info("built %s: size %s, spacing %s, origin %s", dst, out.GetSize(), out.GetSpacing(),
             tuple(round(o, 3) for o in out.GetOrigin()))
    return dst


def _ts269(cache: Path) -> Path:
    dst = cache / "ts269_ct.nii.gz"
    if dst.is_file():
        import SimpleITK as sitk

        r = sitk.ImageFileReader()
        r.SetFileName(str(dst))
        r.ReadImageInformation()
        if tuple(r.GetSize()) == TS269_SIZE:
            return dst
        log.warning("%s has size %s, expected %s: rebuilding", dst, r.GetSize(), TS269_SIZE)
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
    import SimpleITK as sitk

    r = sitk.ImageFileReader()
    r.SetFileName(str(path))
    r.ReadImageInformation()
    return {"path": str(path), "size_xyz": list(r.GetSize()), "spacing_xyz": [round(s, 5) for s in r.GetSpacing()],
            "pixel_type": sitk.GetPixelIDValueAsString(r.GetPixelID())}
