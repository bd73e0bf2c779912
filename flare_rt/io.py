"""Reading and writing images with their geometry, input validation (DICOM series: :mod:`flare_rt.dicom`).

Arrays are in SimpleITK order (z, y, x); ``Volume.spacing`` is given in the same order, ``Volume.geometry``
in ITK's (x, y, z). NIfTI files are read and written with SimpleITK when it is installed, else with
:mod:`flare_rt.nifti` (nibabel's header layout, ITK's rules: the same arrays, geometry and header bytes);
``FLARE_RT_IMAGE_IO=simpleitk|nibabel`` forces one. Other formats and DICOM series need SimpleITK.
"""
from __future__ import annotations

import gzip
import logging
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .atomic import atomic_files, atomic_path
from .errors import ConfigError, InputImageError, OutputError, truncated_error
from .geometry import Geometry
from .metaimage import check_metaimage
from .nifti import HEADER_SIZE, NIFTI_SUFFIXES, gzip_error, voxel_extent

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr")
#: who reads and writes NIfTI: "auto" (SimpleITK when importable, else nibabel), "simpleitk" or "nibabel"
IMAGE_IO_ENV = "FLARE_RT_IMAGE_IO"
#: Intensity check for CT (Hounsfield units): air must be present (min <= -500 HU) and the volume
#: must not be implausibly bright (median <= 1500 HU). MR/PET (non-negative) and unrescaled CT fail.
CT_MIN_AIR_HU = -500.0
CT_MAX_MEDIAN_HU = 1500.0


@dataclass(frozen=True)
class Volume:
    array: np.ndarray  # (z, y, x)
    geometry: Geometry  # the grid to write the labels back on
    source: str

    def __post_init__(self) -> None:
        if self.array.shape != self.geometry.shape:
            raise ConfigError(f"{self.source}: array shape {self.array.shape} does not match its geometry "
                              f"{self.geometry.shape} (z, y, x)")

    @property
    def spacing(self) -> tuple[float, float, float]:
        """(z, y, x) mm."""
        x, y, z = self.geometry.spacing
        return z, y, x

    @property
    def direction(self) -> tuple[float, ...]:
        """SimpleITK's nine direction cosines (row-major, columns = index axes x, y, z)."""
        return self.geometry.direction


def image_suffix(path: str | Path) -> str:
    name = str(path).lower()
    return next((s for s in IMAGE_SUFFIXES if name.endswith(s)), "")


def nifti_io() -> str:
    """Who reads and writes NIfTI here: "simpleitk" or "nibabel" (``$FLARE_RT_IMAGE_IO``, default: SimpleITK
    when it can be imported)."""
    choice = os.environ.get(IMAGE_IO_ENV, "").strip().lower() or "auto"
    if choice not in ("auto", "simpleitk", "nibabel"):
        raise ConfigError(f"{IMAGE_IO_ENV}={choice!r}: expected auto, simpleitk or nibabel")
    if choice != "auto":
        return choice
    try:
        import SimpleITK  # noqa: F401
    except ImportError:
        return "nibabel"
    return "simpleitk"


def require_simpleitk(path: Path, doing: str):
    """SimpleITK, or an error saying that ``doing`` (e.g. "reading DICOM series") needs it."""
    try:
        import SimpleITK as sitk
    except ImportError as exc:
        raise InputImageError(f"{path}: {doing} needs SimpleITK, which is not installed (pip install SimpleITK); "
                              "without it, flare-rt segment reads and writes NIfTI (.nii, .nii.gz) only") from exc
    return sitk


def _stored_length(path: Path) -> int:
    """The file's length, uncompressed for ``.gz`` (reading it whole checks the gzip stream's CRC and length)."""
    if not str(path).lower().endswith(".gz"):
        return path.stat().st_size
    n = 0
    try:
        with gzip.open(path, "rb") as fh:
            while chunk := fh.read(1 << 22):
                n += len(chunk)
    except (OSError, EOFError, zlib.error) as exc:
        raise gzip_error(path, exc) from exc
    return n


def _check_file(path: Path) -> None:
    if not path.exists():
        raise InputImageError(f"{path}: no such file or directory")
    if path.is_dir():
        return
    if not os.access(path, os.R_OK):
        raise InputImageError(f"{path}: not readable (permission denied)")
    if path.stat().st_size == 0:
        raise InputImageError(f"{path}: the file is empty (0 bytes)")


def read_image(path: str | Path, series_uid: str | None = None):
    """Read an image file or a DICOM series directory into a SimpleITK image (no validation)."""
    path = Path(path)
    _check_file(path)
    if path.is_dir():
        from .dicom import read_dicom_series

        return read_dicom_series(path, series_uid)
    sitk = require_simpleitk(path, f"reading {image_suffix(path) or path.suffix or 'these'} images")
    suffix = image_suffix(path)
    extent = _nifti_extent(path) if suffix in NIFTI_SUFFIXES else None
    if suffix in (".mha", ".mhd"):
        check_metaimage(path)
    # the file's length is counted (and a gzip stream's CRC checked) on a thread beside ITK's own read (zlib
    # releases the GIL); a corrupt stream or missing voxel data is the error reported, whatever ITK made of it
    with ThreadPoolExecutor(1, thread_name_prefix="flare-rt-gzip") as pool:
        stored = pool.submit(_stored_length, path)
        try:
            image, failure = sitk.ReadImage(str(path)), None
        except RuntimeError as exc:
            image, failure = None, InputImageError(f"{path}: cannot read image: unknown format or corrupt file "
                                                   f"({itk_message(exc)})")
        length = stored.result()
    if extent is not None and length < sum(extent):  # ITK's NIfTI reader fills missing voxels with zeros
        offset, nbytes = extent
        raise truncated_error(path, length - offset, nbytes)
    if failure is not None:
        raise failure
    if suffix in NIFTI_SUFFIXES and image.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64):
        bad = _nifti_nonfinite(path)
        if bad:
            raise InputImageError(f"{path}: {bad} voxels are NaN or infinite; fix or mask them first")
    return image


def read_header(path: str | Path, problem: str = "cannot read the image header"):
    """A SimpleITK ``ImageFileReader`` with ``path``'s header read (no voxels); :class:`InputImageError`
    "``path``: ``problem`` (ITK's reason)" when it cannot be read."""
    sitk = require_simpleitk(Path(path), "reading image headers")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise InputImageError(f"{path}: {problem} ({itk_message(exc)})") from exc
    return reader


def itk_message(exc: Exception) -> str:
    """The reason in an ITK exception text, without its source-file prefix."""
    msg = " ".join(str(exc).split())
    for marker in ("sitk::ERROR:", "ERROR:"):
        if marker in msg:
            msg = msg.rsplit(marker, 1)[1].strip()
            break
    return msg[-200:]


def _nifti_extent(path: Path) -> tuple[int, int] | None:
    """(offset, length) of a NIfTI file's voxel data, from its header (:func:`flare_rt.nifti.voxel_extent`)."""
    opener = gzip.open if str(path).lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            head = fh.read(HEADER_SIZE)
    except (OSError, EOFError, zlib.error) as exc:
        raise gzip_error(path, exc) from exc
    return voxel_extent(head, path)


def _nifti_nonfinite(path: Path) -> int:
    """NaN/inf voxels of a float NIfTI file, read with nibabel: ITK's NIfTI reader silently replaces
    them with 0, so the check in :func:`to_volume` would never see them."""
    import nibabel

    data = np.asanyarray(nibabel.load(str(path)).dataobj)
    return int(np.count_nonzero(~np.isfinite(data)))


def to_volume(image, source: str, force: bool = False) -> Volume:
    """Validate a SimpleITK image as a 3D CT volume and return its array (float32 copy avoided)."""
    sitk = require_simpleitk(Path(source), "reading this image")
    shown = "x".join(str(s) for s in image.GetSize())
    if image.GetNumberOfComponentsPerPixel() == 1 and image.GetDimension() == 4 and image.GetSize()[3] == 1:
        image = image[:, :, :, 0]
    check_shape(source, image.GetSize(), image.GetNumberOfComponentsPerPixel(), image.GetPixelIDTypeAsString(), shown)
    return _volume(sitk.GetArrayFromImage(image), Geometry.of(image), source, image.GetPixelIDTypeAsString(), force)


def check_shape(source: str, size, components: int, pixel_type: str, shown: str | None = None) -> None:
    """One component per voxel, three axes, more than one slice (``size`` in ITK order)."""
    shown = shown or "x".join(str(s) for s in size)
    if components != 1:
        raise InputImageError(f"{source}: {components} components per voxel ({pixel_type}); a CT has one")
    if len(size) != 3:
        raise InputImageError(f"{source}: image is {len(size)}D ({shown}); flare-rt segments 3D CT volumes")
    if min(size) < 2:
        raise InputImageError(f"{source}: image is {shown}, a single slice; flare-rt segments 3D CT volumes")


def _check_finite(array: np.ndarray, source: str) -> None:
    if array.dtype.kind == "f":
        bad = np.count_nonzero(~np.isfinite(array))
        if bad:
            raise InputImageError(f"{source}: {bad} voxels are NaN or infinite; fix or mask them first")


def _volume(array: np.ndarray, geometry: Geometry, source: str, pixel_type: str, force: bool) -> Volume:
    """The voxel checks shared by both readers, then the volume."""
    _check_finite(array, source)
    if array.dtype.kind not in "iuf":
        raise InputImageError(f"{source}: pixel type {pixel_type} is not numeric")
    check_ct_intensities(array, source, force)
    volume = Volume(array=array, geometry=geometry, source=source)
    if min(volume.spacing) <= 0:
        raise InputImageError(f"{source}: non-positive spacing {volume.spacing}")
    return volume


def check_ct_intensities(array: np.ndarray, source: str, force: bool | None) -> None:
    """Refuse intensities that are not CT in HU; ``force=True`` only warns, ``None`` refuses without offering
    ``--force`` (for callers that have no such option)."""
    sample = array.ravel()[:: max(1, array.size // 2_000_000)]
    lo, med = float(array.min()), float(np.median(sample))
    if lo > CT_MIN_AIR_HU or med > CT_MAX_MEDIAN_HU:
        msg = (f"{source}: intensities do not look like CT in Hounsfield units (min {lo:g}, median {med:g}; "
               f"expected min <= {CT_MIN_AIR_HU:g} and median <= {CT_MAX_MEDIAN_HU:g})")
        if force is None:
            raise InputImageError(msg)
        if not force:
            raise InputImageError(msg + "; pass --force to segment anyway")
        log.warning("%s", msg)


def load_volume(path: str | Path, series_uid: str | None = None, force: bool | None = False) -> Volume:
    """Read and validate a CT: a NIfTI, MHA or NRRD file or a DICOM series folder (``force``: see
    :func:`check_ct_intensities`)."""
    if image_suffix(path) in NIFTI_SUFFIXES and nifti_io() == "nibabel":
        return _load_nifti(Path(path), str(path), force)
    return to_volume(read_image(path, series_uid), str(path), force)


def _load_nifti(path: Path, source: str, force: bool) -> Volume:
    """:func:`load_volume` without SimpleITK: the same arrays, geometry and error lines."""
    from .nifti import read_nifti

    _check_file(path)
    if path.is_dir():
        raise InputImageError(f"{path}: a folder named like a NIfTI file; reading DICOM series needs SimpleITK "
                              "(pip install SimpleITK)")
    image = read_nifti(path)
    if image.components == 1:  # as read_image: NaN/inf voxels before the shape checks
        _check_finite(image.array, str(path))
    check_shape(source, image.size, image.components, image.pixel_type)
    return _volume(image.array, image.geometry, source, image.pixel_type, force)


def write_labels(labels: np.ndarray, geometry: Geometry, path: str | Path) -> Path:
    """Write uint8 labels on ``geometry`` (spacing/origin/direction), atomically (temp + rename)."""
    path = Path(path)
    suffix = image_suffix(path)
    if not suffix:
        raise InputImageError(f"{path}: unknown output format; use one of {', '.join(IMAGE_SUFFIXES)}")
    labels = np.ascontiguousarray(labels.astype(np.uint8, copy=False))
    if suffix in NIFTI_SUFFIXES and nifti_io() == "nibabel":
        from .nifti import write_nifti

        with atomic_path(path) as tmp:
            write_nifti(labels, geometry, tmp)
        return path
    sitk = require_simpleitk(path, f"writing {suffix} images")
    img = geometry.apply_to(sitk.GetImageFromArray(labels))
    # .mhd/.nhdr: the header names its data file, so both are written under their own names elsewhere
    with (atomic_files if suffix in (".mhd", ".nhdr") else atomic_path)(path) as tmp:
        try:
            sitk.WriteImage(img, str(tmp), useCompression=True)
        except RuntimeError as exc:
            raise OutputError(f"{path}: cannot write ({itk_message(exc)})") from exc
    return path


def write_probabilities(probs: np.ndarray, labels: dict[int, str], path: str | Path) -> Path:
    """``.npz`` with ``probabilities`` (K, z, y, x) float16 and the label names, atomically."""
    with atomic_path(path) as tmp:
        np.savez_compressed(tmp, probabilities=probs, label_ids=np.array(sorted(labels)),
                            label_names=np.array([labels[k] for k in sorted(labels)]))
    return Path(path)
