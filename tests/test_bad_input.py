"""``flare-rt segment`` on bad inputs: a typed exit code, one error line naming the file and the problem,
and no output (not even a temporary or partial file) left behind."""
from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from flare_rt.backends import create_backend
from flare_rt.bundle import Bundle
from flare_rt.cli import main
from flare_rt.errors import InputImageError, OutputError
from flare_rt.io import load_volume, write_labels
from flare_rt.pipeline import SegmentOptions, Segmenter
from flare_rt.resources import packaged_model
from trivial_nets import BandNet, expected_bands

INPUT_ERROR = InputImageError.exit_code  # 2


def run(capsys, *argv: str) -> tuple[int, str]:
    rc = main(["segment", *map(str, argv), "-q"])
    return rc, capsys.readouterr().err


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines()
            if line.startswith(("flare-rt: error", "ERROR", "Traceback", "CRITICAL"))]


def assert_refused(rc: int, err: str, names, *problem: str, code: int = INPUT_ERROR) -> str:
    """Exit ``code``; exactly one error line, naming ``names`` and every word of ``problem``."""
    assert rc == code, f"exit code {rc}, expected {code}; stderr:\n{err}"
    lines = error_lines(err)
    assert len(lines) == 1, f"expected one error line, got {len(lines)}:\n{err}"
    line = lines[0]
    assert line.startswith("flare-rt: error: "), line
    for name in [names] if isinstance(names, (str, Path)) else names:
        assert str(name) in line, f"{name} not named in: {line}"
    for word in problem:
        assert word.lower() in line.lower(), f"{word!r} not in: {line}"
    return line


@pytest.fixture(scope="module")
def ct_path(small_ct_path) -> Path:
    return small_ct_path


@pytest.fixture(scope="module")
def ct(ct_path):
    return sitk.ReadImage(str(ct_path))


@pytest.fixture
def out_dir(tmp_path) -> Path:
    d = tmp_path / "out"
    d.mkdir()
    return d


def assert_empty(folder: Path) -> None:
    left = sorted(p.name for p in folder.iterdir())
    assert left == [], f"files left in the output folder: {left}"


def like(ct, array: np.ndarray):
    img = sitk.GetImageFromArray(array)
    img.CopyInformation(ct)
    return img


def assert_on_grid(out: Path, ref) -> np.ndarray:
    seg = sitk.ReadImage(str(out))
    assert seg.GetPixelID() == sitk.sitkUInt8
    assert seg.GetSize() == ref.GetSize()
    assert seg.GetSpacing() == ref.GetSpacing()
    assert seg.GetOrigin() == ref.GetOrigin()
    assert seg.GetDirection() == ref.GetDirection()
    return sitk.GetArrayFromImage(seg)


# -- unreadable inputs --------------------------------------------------------------------------------
def test_missing_file(capsys, tmp_path, out_dir):
    src = tmp_path / "nope_0000.nii.gz"
    rc, err = run(capsys, src, out_dir / "seg.nii.gz")
    assert_refused(rc, err, src, "no such file")
    assert_empty(out_dir)


def test_random_bytes(capsys, tmp_path, out_dir):
    src = tmp_path / "random.nii.gz"
    src.write_bytes(np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8).tobytes())
    rc, err = run(capsys, src, out_dir / "seg.nii.gz")
    assert_refused(rc, err, src, "corrupt")
    assert_empty(out_dir)


def test_truncated_gzip(capsys, tmp_path, out_dir, ct_path):
    data = ct_path.read_bytes()
    src = tmp_path / "truncated.nii.gz"
    src.write_bytes(data[: len(data) // 2])
    rc, err = run(capsys, src, out_dir / "seg.nii.gz")
    assert_refused(rc, err, src, "truncated")
    assert_empty(out_dir)


def test_valid_gzip_not_an_image(capsys, tmp_path, out_dir):
    src = tmp_path / "notnifti.nii.gz"
    src.write_bytes(gzip.compress(np.random.default_rng(1).integers(0, 256, 50_000, dtype=np.uint8).tobytes()))
    rc, err = run(capsys, src, out_dir / "seg.nii.gz")
    assert_refused(rc, err, src, "not a NIfTI file")
    assert_empty(out_dir)


@pytest.mark.parametrize("name, content, words", [
    ("empty.nii.gz", b"", ("the file is empty", "0 bytes")),
    ("short.nii", b"abc", ("truncated NIfTI header",)),
    ("text.mha", b"hello, not an image", ("cannot read image", "unknown format or corrupt")),
])
def test_errors_in_our_words(capsys, tmp_path, out_dir, name, content, words):
    src = tmp_path / name
    src.write_bytes(content)
    rc, err = run(capsys, src, out_dir / "seg.nii.gz")
    line = assert_refused(rc, err, src, *words)
    assert "sitk::ERROR" not in line and ".cxx" not in line  # no library internals
    assert_empty(out_dir)


@pytest.fixture(params=["simpleitk", "nibabel"])
def nifti_reader(request, monkeypatch) -> str:
    monkeypatch.setenv("FLARE_RT_IMAGE_IO", request.param)
    return request.param


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("kept", [0.5, 0.0])  # half the voxels, or the header alone
def test_truncated_nifti_voxels(capsys, tmp_path, out_dir, ct_path, nifti_reader, suffix, kept):
    """ITK's NIfTI reader fills voxels missing at the end of the file with zeros and succeeds: the length the
    header promises is checked on both readers."""
    raw = gzip.decompress(ct_path.read_bytes())
    offset = int(np.frombuffer(raw[108:112], "<f4")[0])  # vox_offset
    nbytes = len(raw) - offset
    cut = raw[: offset + int(nbytes * kept)]
    src = tmp_path / f"cut{suffix}"
    src.write_bytes(gzip.compress(cut) if suffix == ".nii.gz" else cut)
    rc, err = run(capsys, src, out_dir / "seg.nii.gz")
    assert_refused(rc, err, src, f"{int(nbytes * kept)} bytes of voxel data where its header promises {nbytes}",
                   "truncated")
    assert_empty(out_dir)


def test_truncated_nifti_header(capsys, tmp_path, out_dir, ct_path, nifti_reader):
    src = tmp_path / "cut.nii.gz"
    src.write_bytes(gzip.compress(gzip.decompress(ct_path.read_bytes())[:200]))
    rc, err = run(capsys, src, out_dir / "seg.nii.gz")
    assert_refused(rc, err, src, "truncated NIfTI header (200 bytes)")
    assert_empty(out_dir)


@pytest.mark.parametrize("suffix", [".mha", ".mhd"])
def test_truncated_metaimage(capfd, tmp_path, out_dir, ct, suffix):
    """ITK's MetaImage reader prints its own lines and then blames "No such file or directory"."""
    src = tmp_path / f"ct{suffix}"
    sitk.WriteImage(ct, str(src))  # uncompressed
    data = src if suffix == ".mha" else tmp_path / "ct.raw"
    blob = data.read_bytes()
    nbytes = ct.GetNumberOfPixels() * ct.GetSizeOfPixelComponent()
    data.write_bytes(blob[: len(blob) - nbytes // 2])
    capfd.readouterr()  # ITK's warnings while writing the test's input
    rc, err = run(capfd, src, out_dir / "seg.nii.gz")
    assert_refused(rc, err, src, f"{nbytes - nbytes // 2} bytes of voxel data where its header promises {nbytes}")
    assert "MetaImage" not in err and "No such file" not in err, err
    assert_empty(out_dir)


def test_metaimage_without_its_data_file(capfd, tmp_path, out_dir, ct):
    src = tmp_path / "ct.mhd"
    sitk.WriteImage(ct, str(src))
    (tmp_path / "ct.raw").unlink()
    capfd.readouterr()
    rc, err = run(capfd, src, out_dir / "seg.nii.gz")
    assert_refused(rc, err, [src, tmp_path / "ct.raw"], "does not exist")
    assert "MetaImage" not in err, err
    assert_empty(out_dir)


# -- not a 3D CT ----------------------------------------------------------------------------------------
def test_2d_image(capsys, tmp_path, out_dir, ct):
    src = tmp_path / "slice.nii.gz"
    sitk.WriteImage(ct[:, :, 15], str(src))
    assert sitk.ReadImage(str(src)).GetDimension() == 2
    rc, err = run(capsys, src, out_dir / "seg.nii.gz")
    assert_refused(rc, err, src, "2D", "3D")
    assert_empty(out_dir)


def test_4d_image(capsys, tmp_path, out_dir, ct):
    src = tmp_path / "dynamic.nii.gz"
    sitk.WriteImage(sitk.JoinSeries([ct] * 4), str(src))
    assert sitk.ReadImage(str(src)).GetSize()[3] == 4
    rc, err = run(capsys, src, out_dir / "seg.nii.gz")
    assert_refused(rc, err, src, "4D", "x4")
    assert_empty(out_dir)


@pytest.fixture(scope="module")
def mr_like(tmp_path_factory, ct) -> Path:
    """The CT rescaled to 0..1000: non-negative, as MR or PET."""
    a = sitk.GetArrayFromImage(ct).astype(np.float32)
    a = (a - a.min()) / (a.max() - a.min()) * 1000
    path = tmp_path_factory.mktemp("mr") / "mr_like.nii.gz"
    sitk.WriteImage(like(ct, a), str(path))
    return path


def test_mr_like_intensities_refused(capsys, out_dir, mr_like):
    rc, err = run(capsys, mr_like, out_dir / "seg.nii.gz")
    assert_refused(rc, err, mr_like, "look like CT", "--force")
    assert_empty(out_dir)


def test_mr_like_intensities_with_force(capsys, out_dir, mr_like, ct):
    out = out_dir / "seg.nii.gz"
    rc, err = run(capsys, mr_like, out, "--force", "--step", "1")  # abutting tiles: half the time
    assert rc == 0, err
    assert error_lines(err) == [], err
    assert "look like CT" in err  # still warned about
    assert_on_grid(out, ct)
    assert sorted(p.name for p in out_dir.iterdir()) == ["seg.nii.gz"]


@pytest.mark.parametrize("value, word", [(np.nan, "NaN"), (np.inf, "infinite"), (-np.inf, "infinite")])
@pytest.mark.parametrize("suffix", [".nii.gz", ".mha"])
def test_non_finite_voxels(capsys, tmp_path, out_dir, ct, value, word, suffix):
    a = sitk.GetArrayFromImage(ct).astype(np.float32)
    a[10, 40:42, 50:53] = value  # 6 voxels
    src = tmp_path / f"nonfinite{suffix}"
    sitk.WriteImage(like(ct, a), str(src))
    rc, err = run(capsys, src, out_dir / "seg.nii.gz")
    line = assert_refused(rc, err, src, word)
    assert "6 voxels" in line
    assert_empty(out_dir)


# -- small but valid --------------------------------------------------------------------------------------
def test_volume_smaller_than_a_patch(capsys, tmp_path, out_dir, ct):
    small = ct[50:70, 0:30, 10:20]  # 20x30x10 voxels (60x90x30 mm), body edge and air: one patch is 230x154x128 mm
    assert small.GetSize() == (20, 30, 10)
    src = tmp_path / "small.nii.gz"
    sitk.WriteImage(small, str(src))
    out = out_dir / "small_seg.nii.gz"
    rc, err = run(capsys, src, out)
    assert rc == 0, err
    assert error_lines(err) == [], err
    labels = assert_on_grid(out, sitk.ReadImage(str(src)))
    assert labels.shape == (10, 30, 20)
    assert sorted(p.name for p in out_dir.iterdir()) == ["small_seg.nii.gz"]
    # the CLI gives what the API gives on the same volume (padding to a patch and back is the pipeline's)
    bundle = Bundle.load(packaged_model())
    api = Segmenter(bundle, create_backend(bundle, "auto", "auto"), SegmentOptions()).predict(load_volume(src))
    np.testing.assert_array_equal(labels, api.labels)


def test_volume_smaller_than_a_patch_keeps_its_content(tmp_path, ct):
    """Padded to the patch and cropped back: with a network whose answer is known, the labels follow the
    image (resampling to 4 x 1.2 x 1.2 mm and back blurs the band edges only)."""
    small = ct[50:70, 0:30, 10:20]
    src = tmp_path / "small.nii.gz"
    sitk.WriteImage(small, str(src))
    bundle = Bundle.load(packaged_model())
    pred = Segmenter(bundle, BandNet(), SegmentOptions(mode="faithful")).predict(load_volume(src))
    expected = expected_bands(sitk.GetArrayFromImage(small), bundle.meta.normalization)
    assert pred.labels.shape == expected.shape == (10, 30, 20)
    assert (pred.labels == expected).mean() > 0.75


# -- output path refusals ---------------------------------------------------------------------------------
@pytest.mark.parametrize("spelling", ["same", "dotdot"])
def test_output_equal_to_input(capsys, tmp_path, ct_path, spelling):
    folder = tmp_path / "case"
    folder.mkdir()
    src = folder / "ct.nii.gz"
    shutil.copyfile(ct_path, src)
    before, mtime = src.read_bytes(), src.stat().st_mtime_ns
    dst = src if spelling == "same" else folder / ".." / "case" / "ct.nii.gz"
    rc, err = run(capsys, src, dst)
    assert_refused(rc, err, dst, "overwrite the input", code=OUTPUT_ERROR)
    assert src.read_bytes() == before and src.stat().st_mtime_ns == mtime
    assert sorted(p.name for p in folder.iterdir()) == ["ct.nii.gz"]


def test_existing_output_without_overwrite(capsys, out_dir, ct_path):
    out = out_dir / "seg.nii.gz"
    out.write_bytes(b"an earlier result")
    os.utime(out, ns=(1_000_000_000, 1_000_000_000))
    rc, err = run(capsys, ct_path, out)
    assert_refused(rc, err, out, "exists", "--overwrite", code=OUTPUT_ERROR)
    assert out.read_bytes() == b"an earlier result"
    assert out.stat().st_mtime_ns == 1_000_000_000
    assert sorted(p.name for p in out_dir.iterdir()) == ["seg.nii.gz"]


@pytest.mark.parametrize("option", ["--report", "--save-network-labels"])
def test_an_existing_report_is_an_existing_output_too(capsys, out_dir, ct_path, option):
    extra = out_dir / ("report.json" if option == "--report" else "network.npz")
    extra.write_text("an earlier run")
    rc, err = run(capsys, ct_path, out_dir / "seg.nii.gz", option, extra)
    assert_refused(rc, err, extra, "exists", "--overwrite", code=OUTPUT_ERROR)
    assert sorted(p.name for p in out_dir.iterdir()) == [extra.name] and extra.read_text() == "an earlier run"


# -- DICOM folders ------------------------------------------------------------------------------------------
def test_dicom_with_missing_slice(capsys, tmp_path, out_dir, shared_data):
    src = tmp_path / "dicom_gap"
    shutil.copytree(shared_data / "ts_dicom", src)
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(src))  # sorted along the slice normal
    assert len(files) == 20
    Path(files[len(files) // 2]).unlink()  # a middle slice: one gap of 4 mm among 2 mm steps
    rc, err = run(capsys, src, out_dir / "seg.nii.gz")
    line = assert_refused(rc, err, src, "uneven slice spacing", "missing")
    assert "2.000 to 4.000 mm" in line
    assert_empty(out_dir)


def test_empty_folder_without_library_warnings(capfd, tmp_path, out_dir):
    """GDCM's warning about a folder without series goes to the C++ stderr: only flare-rt's line is shown."""
    src = tmp_path / "empty"
    src.mkdir()
    rc, err = run(capfd, src, out_dir / "seg.nii.gz")
    assert_refused(rc, err, src, "no DICOM series")
    assert [ln for ln in err.splitlines() if not ln.startswith(("flare-rt: ", "WARNING flare_rt"))] == [], err
    assert_empty(out_dir)


def test_folder_without_dicom(capsys, tmp_path, out_dir):
    src = tmp_path / "not_dicom"
    src.mkdir()
    (src / "README.txt").write_text("no images here\n")
    (src / "IM0001").write_bytes(np.random.default_rng(2).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    rc, err = run(capsys, src, out_dir / "seg.nii.gz")
    assert_refused(rc, err, src, "no DICOM series")
    assert_empty(out_dir)


# -- outputs that cannot be written ---------------------------------------------------------------------------
OUTPUT_ERROR = OutputError.exit_code  # 8


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if the model is loaded: an output that cannot be written is refused before any work."""
    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the output location was checked")

    monkeypatch.setattr("flare_rt.cli.load_segmenter", load)


def test_output_under_a_file(capsys, tmp_path, ct_path, no_model):
    blocker = tmp_path / "results"
    blocker.write_text("a file where the output folder would be")
    rc, err = run(capsys, ct_path, blocker / "seg.nii.gz")
    assert_refused(rc, err, blocker, "cannot write", "not a folder", code=OUTPUT_ERROR)
    assert blocker.read_text() == "a file where the output folder would be"


def test_output_folder_without_permission(capsys, tmp_path, ct_path, no_model, monkeypatch):
    """What a read-only mount or a folder of another user gives (tests may run as root, whom chmod does not
    stop, so the operating system's refusal is stood in for)."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("flare_rt.atomic.tempfile.mkstemp", refuse)
    rc, err = run(capsys, ct_path, out_dir / "seg.nii.gz")
    assert_refused(rc, err, out_dir, "cannot write (Permission denied)", code=OUTPUT_ERROR)
    assert_empty(out_dir)


@pytest.fixture
def one_case(tmp_path, ct_path) -> Path:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "case_0000.nii.gz").symlink_to(ct_path)
    return inputs


def test_folder_mode_output_under_a_file(capsys, tmp_path, one_case, no_model):
    blocker = tmp_path / "results"
    blocker.write_text("")
    rc, err = run(capsys, one_case, blocker / "out")
    assert_refused(rc, err, blocker / "out", "cannot write", code=OUTPUT_ERROR)


def test_statistics_path_not_writable_in_folder_mode(capsys, tmp_path, one_case, no_model):
    blocker = tmp_path / "results"
    blocker.write_text("")
    rc, err = run(capsys, one_case, tmp_path / "out", "--statistics", blocker / "stats.csv")
    assert_refused(rc, err, blocker, "cannot write", code=OUTPUT_ERROR)


@pytest.mark.parametrize("suffix, data_file", [(".mhd", "seg.zraw"), (".nhdr", "seg.raw.gz"), (".nii.gz", None)])
def test_failed_write_leaves_no_output(tmp_path, ct, suffix, data_file):
    """A write that fails part-way (here: the name of the file to write is taken by a folder) leaves neither
    a header without its data, nor a temporary file, nor the data alone."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    taken = out_dir / (data_file or f"seg{suffix}")
    taken.mkdir()
    (taken / "keep").write_text("")
    labels = np.zeros(sitk.GetArrayViewFromImage(ct).shape, np.uint8)
    from flare_rt.geometry import Geometry

    with pytest.raises(OutputError, match=r"seg\.(mhd|nhdr|nii\.gz): cannot write"):
        write_labels(labels, Geometry.of(ct), out_dir / f"seg{suffix}")
    assert sorted(p.name for p in out_dir.iterdir()) == [taken.name]
    assert sorted(p.name for p in taken.iterdir()) == ["keep"]
