"""bench/predict_check.py (predict.sh on the GPU machine): its folder of cases and its verdict on the
outputs. (The whole run, predict.sh with the CPU backend, is tests/container/test_predict_sh.py.)"""
from __future__ import annotations

import shutil

import numpy as np
import pytest

import predict_check


@pytest.fixture
def folder(tmp_path, example_ct_path, small_ct_path):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copyfile(example_ct_path, data / "ts_example_ct.nii.gz")
    shutil.copyfile(small_ct_path, data / "ts_example_ct_sm.nii.gz")
    return predict_check.prepare(data, tmp_path / "work")


def write_labels(inputs, outputs, case, dtype=np.uint8, shape=None):
    import nibabel as nib

    src = nib.load(str(inputs / f"{case}_0000.nii.gz"))
    labels = np.zeros(shape or src.shape, dtype=dtype)
    labels[1:3] = 1
    labels[3:5] = 2
    outputs.mkdir(exist_ok=True)
    nib.save(nib.Nifti1Image(labels, src.affine), str(outputs / f"{case}.nii.gz"))


def test_the_folder_holds_two_real_cases_and_a_corrupt_one(folder):
    inputs, outputs = folder
    assert sorted(p.name for p in inputs.iterdir()) == ["caseA_0000.nii.gz", "caseB_0000.nii.gz", "caseC_0000.nii.gz"]
    assert (inputs / "caseC_0000.nii.gz").stat().st_size == 5000 and not outputs.exists()


def test_the_verdict(folder):
    inputs, outputs = folder
    write_labels(inputs, outputs, "caseA")
    write_labels(inputs, outputs, "caseB")
    assert predict_check.check(inputs, outputs, 1) == []
    assert "exited 0, expected 1" in predict_check.check(inputs, outputs, 0)[0]
    write_labels(inputs, outputs, "caseB", dtype=np.int16)
    assert any("dtype int16" in p for p in predict_check.check(inputs, outputs, 1))
    write_labels(inputs, outputs, "caseB", shape=(5, 6, 7))
    assert any("grid (5, 6, 7)" in p for p in predict_check.check(inputs, outputs, 1))
    (outputs / "caseB.nii.gz").unlink()
    write_labels(inputs, outputs, "caseC")
    assert any("outputs ['caseA.nii.gz', 'caseC.nii.gz']" in p for p in predict_check.check(inputs, outputs, 1))
