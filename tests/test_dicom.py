"""DICOM folders as exported: a study folder with a subfolder per series, a series spread over folders, several
series (the largest segmented, ``--series UID`` for another), series without a UID, on the real DICOM patient of
the shared data (anonymised: its SeriesInstanceUID is blank). Each result is compared with the labels of the same
series segmented on its own."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from dicom_series import write_dicom_series

from flare_rt.cli import main
from flare_rt.dicom import find_series
from flare_rt.io import load_volume

PATIENT_UID = "1.2.826.0.1.3680043.2.1125.1.6"  # the patient's series written again with a UID
OTHER_UID = "1.2.826.0.1.3680043.2.1125.1.7"  # a second, smaller CT series of the same study
HIDDEN_UID = "1.2.826.0.1.3680043.2.1125.1.8"  # a bigger one in a hidden folder: never looked at


def segment(src: Path, out: Path, *options: str) -> tuple[int, sitk.Image | None]:
    rc = main(["segment", str(src), str(out), "-q", *options])
    return rc, sitk.ReadImage(str(out)) if rc == 0 else None


def same_result(a: sitk.Image, b: sitk.Image) -> None:
    assert a.GetSize() == b.GetSize() and a.GetSpacing() == b.GetSpacing()
    assert a.GetOrigin() == b.GetOrigin() and a.GetDirection() == b.GetDirection()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))


@pytest.fixture(scope="module")
def patient(shared_data) -> Path:
    return shared_data / "ts_dicom"


def read_series(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def test_the_patient_s_series_has_no_uid(patient):
    """What the tests below rely on: the shared patient is one series, its SeriesInstanceUID blank."""
    assert sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(patient)) == ("",)


@pytest.fixture(scope="module")
def alone(patient, tmp_path_factory) -> sitk.Image:
    """The patient's series segmented from its own folder (every file directly in it)."""
    rc, img = segment(patient, tmp_path_factory.mktemp("alone") / "seg.nii.gz")
    assert rc == 0 and img.GetSize() == (512, 512, 20)
    return img


@pytest.fixture(scope="module")
def other_ct(small_ct_path) -> sitk.Image:
    """10 slices of another real CT (122x101, 3 mm): the smaller series."""
    return sitk.ReadImage(str(small_ct_path))[:, :, 10:20]


@pytest.fixture(scope="module")
def study(patient, other_ct, small_ct_path, tmp_path_factory) -> Path:
    """study/CT/SE1: the patient (20 slices); study/CT/SE2: the smaller series; study/.snapshot/SE3: a 30-slice
    series a hidden folder holds; a text file beside them."""
    root = tmp_path_factory.mktemp("study")
    shutil.copytree(patient, root / "CT" / "SE1")
    write_dicom_series(other_ct, root / "CT" / "SE2", OTHER_UID)
    write_dicom_series(sitk.ReadImage(str(small_ct_path)), root / ".snapshot" / "SE3", HIDDEN_UID)
    (root / "CT" / "README.txt").write_text("exported by a PACS\n")
    return root


def test_the_series_of_a_study_folder_are_found_below_it(study):
    found = find_series(study)
    assert [(s.uid, len(s.files), s.folders) for s in found] == [
        ("", 20, (Path("CT/SE1"),)), (OTHER_UID, 10, (Path("CT/SE2"),))]


def test_the_largest_series_is_segmented_and_the_others_named(study, alone, tmp_path, capsys):
    rc, img = segment(study, tmp_path / "seg.nii.gz")
    assert rc == 0
    same_result(img, alone)
    (line,) = [ln for ln in capsys.readouterr().err.splitlines() if "DICOM series" in ln]
    assert line.startswith("WARNING flare_rt.dicom: ")
    assert (f"2 DICOM series: a series without UID (20 files in CT/SE1); {OTHER_UID} (10 files in CT/SE2); "
            "using the largest, a series without UID (20 files in CT/SE1); pass --series UID") in line
    assert HIDDEN_UID not in line


def test_series_picks_another_series_of_the_study(study, other_ct, tmp_path):
    rc, img = segment(study, tmp_path / "seg.nii.gz", "--series", OTHER_UID)
    assert rc == 0
    sitk.WriteImage(other_ct, str(tmp_path / "other.nii.gz"))
    rc, expected = segment(tmp_path / "other.nii.gz", tmp_path / "other_seg.nii.gz")
    assert rc == 0 and img.GetSize() == (122, 101, 10)
    same_result(img, expected)


def test_an_unknown_series_is_refused_with_the_series_found(study, tmp_path, capsys):
    rc = main(["segment", str(study), str(tmp_path / "seg.nii.gz"), "-q", "--series", HIDDEN_UID])
    err = capsys.readouterr().err
    assert rc == 2
    (line,) = [ln for ln in err.splitlines() if ln.startswith("flare-rt: error")]
    assert (f"{study}: series {HIDDEN_UID} not found; available: a series without UID (20 files in CT/SE1); "
            f"{OTHER_UID} (10 files in CT/SE2) (a series without UID: give its folder)") in line
    assert list(tmp_path.iterdir()) == []


def same_volume(a: Path, b: Path) -> None:
    va, vb = load_volume(a), load_volume(b)
    assert va.geometry == vb.geometry
    np.testing.assert_array_equal(va.array, vb.array)


def test_a_series_spread_over_folders_is_read_in_slice_order(patient, tmp_path):
    """Every other slice in a second folder (as some exports split a series): one UID, so merged and sorted
    along the slice normal, the series reads as it does from one folder."""
    write_dicom_series(read_series(patient), tmp_path / "whole", PATIENT_UID)  # the patient, with a UID
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(tmp_path / "whole"))  # in slice order
    for k, f in enumerate(files):
        part = tmp_path / "split" / ("a" if k % 2 else "b")
        part.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, part / f"IM{len(files) - k:04d}")  # names in reverse slice order
    (series,) = find_series(tmp_path / "split")
    assert (series.uid, series.folders, len(series.files)) == (PATIENT_UID, (Path("a"), Path("b")), 20)
    same_volume(tmp_path / "split", tmp_path / "whole")


def test_series_without_uid_in_two_folders_are_two_series(patient, tmp_path):
    """Blank UIDs say nothing about which files belong together: each folder's files are a series of their own
    (merged, the patient and a part of it would be duplicate slices)."""
    shutil.copytree(patient, tmp_path / "anon" / "A")
    (tmp_path / "anon" / "B").mkdir()
    for f in sorted(patient.iterdir())[:8]:
        shutil.copy(f, tmp_path / "anon" / "B" / f.name)
    found = find_series(tmp_path / "anon")
    assert [(s.uid, len(s.files), s.folders) for s in found] == [("", 20, (Path("A"),)), ("", 8, (Path("B"),))]
    same_volume(tmp_path / "anon", patient)


def test_a_folder_without_series_below_it_is_one_line(tmp_path, capsys):
    (tmp_path / "study" / "SE1").mkdir(parents=True)
    (tmp_path / "study" / "SE1" / "notes.txt").write_text("no images\n")
    rc = main(["segment", str(tmp_path / "study"), str(tmp_path / "seg.nii.gz"), "-q"])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"flare-rt: error: {tmp_path / 'study'}: no DICOM series found in this folder or its subfolders" in err
    assert not (tmp_path / "seg.nii.gz").exists()


def test_linked_series_folders_are_followed_once(patient, tmp_path):
    """A folder of links to series folders (as some pipelines gather a patient's series): followed; a link back
    up the tree does not loop."""
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "SE1").symlink_to(patient, target_is_directory=True)
    (tmp_path / "links" / "again").symlink_to(tmp_path / "links", target_is_directory=True)
    found = find_series(tmp_path / "links")
    assert [(s.uid, len(s.files), s.folders) for s in found] == [("", 20, (Path("SE1"),))]
    same_volume(tmp_path / "links", patient)
