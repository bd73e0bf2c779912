"""DICOM series: finding them in a folder and its subfolders, choosing one, checking its slice geometry, reading it.

A CT export is often a study folder with a subfolder per series (``study/SE0001/IM0001``, a PACS or CD
layout), sometimes with one series spread over several folders; the series are found wherever they are
below the folder given (hidden folders skipped), the files of one series from several folders merged in
slice order. A series without a SeriesInstanceUID (some anonymisers blank it) is never merged: it is the files
of one folder. The largest series is segmented unless ``--series UID`` names another.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputImageError
from .io import itk_message, read_header, require_simpleitk

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DicomSeries:
    uid: str
    files: tuple[str, ...]  # in slice order within each folder (GDCM's), folder after folder
    folders: tuple[Path, ...]  # where its files are, relative to the folder searched

    def describe(self) -> str:
        where = ", ".join(str(f) for f in self.folders)
        return f"{self.uid or 'a series without UID'} ({len(self.files)} files in {where})"


def dicom_series_ids(folder: Path) -> list[str]:
    """The DICOM series UIDs of the files directly in ``folder`` (none for a folder without DICOM files), without
    the warning GDCM prints on stderr for a folder that holds no series."""
    sitk = require_simpleitk(folder, "reading DICOM series")
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        return list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)) or ())
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def _folders(root: Path):
    """``root`` and every folder below it, hidden ones skipped, in a fixed order; linked folders are followed,
    each real folder visited once (a link loop ends)."""
    seen = {os.path.realpath(root)}
    for here, dirs, _ in os.walk(root, followlinks=True):
        kept = []
        for d in sorted(dirs):
            real = os.path.realpath(os.path.join(here, d))
            if not d.startswith(".") and real not in seen:
                seen.add(real)
                kept.append(d)
        dirs[:] = kept
        yield Path(here)


def find_series(root: Path) -> list[DicomSeries]:
    """Every DICOM series in ``root`` and its subfolders, largest first (ties: by UID, then folder)."""
    sitk = require_simpleitk(root, "reading DICOM series")
    files: dict[tuple[str, Path | None], list[str]] = {}
    folders: dict[tuple[str, Path | None], list[Path]] = {}
    for folder in _folders(root):
        for uid in dicom_series_ids(folder):
            key = (uid, None if uid else folder)  # no UID: nothing says two folders hold one series
            files.setdefault(key, []).extend(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid))
            folders.setdefault(key, []).append(folder.relative_to(root))
    series = [DicomSeries(key[0], tuple(files[key]), tuple(folders[key])) for key in files]
    return sorted(series, key=lambda s: (-len(s.files), s.uid, s.folders))


def choose_series(root: Path, series_uid: str | None = None) -> DicomSeries:
    """The series to segment: ``series_uid``, else the largest (a warning lists the others)."""
    found = find_series(root)
    if not found:
        raise InputImageError(f"{root}: no DICOM series found in this folder or its subfolders")
    if series_uid is not None:
        chosen = next((s for s in found if s.uid and s.uid == series_uid), None)
        if chosen is None:
            hint = " (a series without UID: give its folder)" if not all(s.uid for s in found) else ""
            raise InputImageError(f"{root}: series {series_uid} not found; available: "
                                  f"{'; '.join(s.describe() for s in found)}{hint}")
        return chosen
    if len(found) > 1:
        log.warning("%s: %d DICOM series: %s; using the largest, %s; pass --series UID (or the series' folder) to "
                    "choose", root, len(found), "; ".join(s.describe() for s in found), found[0].describe())
    return found[0]


def read_dicom_series(root: Path, series_uid: str | None = None):
    """The chosen series (:func:`choose_series`) as a SimpleITK image, its slice geometry checked."""
    sitk = require_simpleitk(root, "reading DICOM series")
    series = choose_series(root, series_uid)
    if len(series.files) < 2:
        raise InputImageError(f"{root}: the DICOM series has {len(series.files)} slice; a 3D volume needs several")
    pos, normal = _slice_positions(series.files)
    # one folder: GDCM's order; several: merged along the slice normal, as GDCM sorts within a folder
    order = np.arange(len(pos)) if len(series.folders) == 1 else np.argsort(pos @ normal, kind="stable")
    check_slice_geometry(root, pos[order], normal)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([series.files[i] for i in order])
    try:
        return reader.Execute()
    except RuntimeError as exc:
        raise InputImageError(f"{root}: cannot read DICOM series {series.uid} ({itk_message(exc)})") from exc


def _slice_positions(files) -> tuple[np.ndarray, np.ndarray]:
    """Each file's image position (n, 3) and the slice normal of the first, from the headers alone."""
    pos, normal = [], None
    for f in files:
        r = read_header(f, "unreadable DICOM file")
        pos.append(np.array(r.GetOrigin(), dtype=float))
        if normal is None:
            d = np.array(r.GetDirection(), dtype=float).reshape(3, 3)
            normal = np.cross(d[:, 0], d[:, 1])
    return np.stack(pos), normal


def check_slice_geometry(folder: Path, pos: np.ndarray, normal: np.ndarray, tol: float = 0.01) -> None:
    """Reject gantry tilt (slice positions ``pos`` (n, 3), in slice order, not along the slice ``normal``) and
    uneven slice gaps."""
    steps = np.diff(pos, axis=0)
    gaps = np.linalg.norm(steps, axis=1)
    if np.any(gaps < 1e-6):
        raise InputImageError(f"{folder}: duplicate slice positions in the DICOM series")
    cosines = np.abs(steps @ normal) / gaps
    if np.any(cosines < 1 - 1e-4):
        angle = float(np.degrees(np.arccos(np.clip(cosines.min(), -1, 1))))
        raise InputImageError(f"{folder}: gantry tilt of {angle:.2f} degrees; resample the series to an "
                              "orthogonal grid first (e.g. dcm2niix) and pass the NIfTI")
    if gaps.max() - gaps.min() > tol * gaps.mean() + 1e-3:
        raise InputImageError(f"{folder}: uneven slice spacing ({gaps.min():.3f} to {gaps.max():.3f} mm; missing "
                              "slices?); fix the series or convert it to NIfTI with interpolation")
