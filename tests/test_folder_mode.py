"""Folder mode (``segment IN_DIR OUT_DIR`` over ``*_0000.nii.gz``): good cases written, a bad case reported
without stopping the others, existing outputs skipped unless --overwrite, probabilities saved."""
from __future__ import annotations

import contextlib
import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from flare_rt.cli import main

OLD_NS = 1_000_000_000  # an mtime (2001) no run of this test can produce
QUICK = ("--step", "1")  # abutting tiles: half the network time; folder handling is what is tested here


def run(capsys, *argv) -> tuple[int, str]:
    rc = main(["segment", *map(str, argv), "-q"])
    return rc, capsys.readouterr().err


@pytest.fixture(scope="module")
def ct(shared_data):
    return sitk.ReadImage(str(shared_data / "ts_example_ct_sm.nii.gz"))


@pytest.fixture(scope="module")
def cases(tmp_path_factory, shared_data) -> Path:
    src = tmp_path_factory.mktemp("folder_in")
    for name in ("a", "b"):
        shutil.copyfile(shared_data / "ts_example_ct_sm.nii.gz", src / f"{name}_0000.nii.gz")
    (src / "c_0000.nii.gz").write_bytes(np.random.default_rng(0).integers(0, 256, 20_000, dtype=np.uint8).tobytes())
    return src


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, cases):
    out = tmp_path_factory.mktemp("folder_out")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):  # module scope: capsys is not available here
        rc = main(["segment", str(cases), str(out), "-q", *QUICK])
    return rc, out, err.getvalue()


def check_failure_report(err: str) -> None:
    assert "1 of 3 cases failed" in err, err
    failed = [line for line in err.splitlines() if line.startswith("  ")]
    assert len(failed) == 1 and failed[0].strip().startswith("c_0000.nii.gz:"), err
    assert "corrupt" in failed[0]
    assert "a_0000" not in err and "b_0000" not in err, err


def test_first_run(first_run, ct):
    rc, out, err = first_run
    assert rc == 1
    assert sorted(p.name for p in out.iterdir()) == ["a.nii.gz", "b.nii.gz"]  # no c, no temp files
    check_failure_report(err)
    labels = []
    for name in ("a", "b"):
        seg = sitk.ReadImage(str(out / f"{name}.nii.gz"))
        assert seg.GetPixelID() == sitk.sitkUInt8
        assert seg.GetSize() == ct.GetSize()
        assert seg.GetSpacing() == ct.GetSpacing()
        assert seg.GetOrigin() == ct.GetOrigin()
        assert seg.GetDirection() == ct.GetDirection()
        labels.append(sitk.GetArrayFromImage(seg))
    assert len(np.unique(labels[0])) >= 3  # background and organs: the model really ran
    np.testing.assert_array_equal(labels[0], labels[1])  # same input, same result


def test_rerun_without_overwrite_skips_existing(capsys, first_run, cases):
    _, out, _ = first_run
    capsys.readouterr()
    for name in ("a", "b"):
        os.utime(out / f"{name}.nii.gz", ns=(OLD_NS, OLD_NS))
    before = {name: (out / f"{name}.nii.gz").read_bytes() for name in ("a", "b")}
    rc, err = run(capsys, cases, out, *QUICK)
    assert rc == 1  # c still fails
    check_failure_report(err)
    for name in ("a", "b"):
        assert (out / f"{name}.nii.gz").stat().st_mtime_ns == OLD_NS, f"{name} was rewritten"
        assert (out / f"{name}.nii.gz").read_bytes() == before[name]
    assert sorted(p.name for p in out.iterdir()) == ["a.nii.gz", "b.nii.gz"]


def test_overwrite_redoes_and_saves_probabilities(capsys, first_run, cases, ct):
    _, out, _ = first_run
    capsys.readouterr()
    for name in ("a", "b"):
        os.utime(out / f"{name}.nii.gz", ns=(OLD_NS, OLD_NS))
    rc, err = run(capsys, cases, out, "--overwrite", "--save-probabilities", *QUICK)
    assert rc == 1
    check_failure_report(err)
    assert sorted(p.name for p in out.iterdir()) == ["a.nii.gz", "b.nii.gz", "probabilities"]
    assert sorted(p.name for p in (out / "probabilities").iterdir()) == ["a.npz", "b.npz"]
    nz, ny, nx = ct.GetSize()[::-1]
    for name in ("a", "b"):
        seg = out / f"{name}.nii.gz"
        assert seg.stat().st_mtime_ns != OLD_NS, f"{name} was not redone with --overwrite"
        labels = sitk.GetArrayFromImage(sitk.ReadImage(str(seg)))
        with np.load(out / "probabilities" / f"{name}.npz") as z:
            probs = z["probabilities"]
            label_ids = z["label_ids"]
        assert probs.shape == (15, nz, ny, nx)
        assert label_ids.tolist() == list(range(15))
        assert np.all(probs >= 0)
        total = probs.astype(np.float32).sum(axis=0)
        np.testing.assert_allclose(total, 1.0, atol=5e-3)  # float16 storage
        # labels and probabilities describe the same prediction
        agree = float(np.mean(probs.argmax(axis=0) == labels))
        assert agree > 0.999, agree  # float16 ties aside, the argmax is the label
