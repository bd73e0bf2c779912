"""A minimal CT DICOM series written from a SimpleITK image (imported by tests as ``dicom_series``)."""
from __future__ import annotations

import locale
from pathlib import Path

import SimpleITK as sitk

STUDY_UID = "1.2.826.0.1.3680043.2.1125.1.1"
SERIES_UID = "1.2.826.0.1.3680043.2.1125.1.2"


def write_dicom_series(img, folder: Path, series: str = SERIES_UID) -> None:
    """A minimal CT series (one file per slice) with the image's geometry, written by SimpleITK/GDCM (whose
    DICOM writer sets the process's C locale: restored afterwards, or later text decoding turns ASCII)."""
    saved = locale.setlocale(locale.LC_ALL)
    try:
        _write_dicom_series(img, folder, series)
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def _write_dicom_series(img, folder: Path, series: str) -> None:
    folder.mkdir(parents=True)
    d = img.GetDirection()
    orientation = "\\".join(f"{v:.10g}" for v in (d[0], d[3], d[6], d[1], d[4], d[7]))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(img.GetDepth()):
        sl = img[:, :, k : k + 1]
        tags = {"0008|0060": "CT", "0020|000d": STUDY_UID, "0020|000e": series, "0020|0037": orientation,
                "0020|0032": "\\".join(f"{v:.10g}" for v in img.TransformIndexToPhysicalPoint((0, 0, k))),
                "0020|0013": str(k + 1), "0018|0050": f"{img.GetSpacing()[2]:g}",
                "0008|0018": f"{series}.{k + 1}", "0008|0016": "1.2.840.10008.5.1.4.1.1.2"}
        for tag, value in tags.items():
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"IM{k:04d}.dcm"))
        writer.Execute(sl)
