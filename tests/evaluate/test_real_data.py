"""Real label map (TotalSegmentator, FLARE ids) against perturbed copies: fast == whole volume."""
from __future__ import annotations


import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from flare_rt.evaluate import EvaluationOptions, evaluate_case, evaluate_folders, read_label_map
from flare_rt.evaluate.reference import reference_score_case
from flare_rt.resources import shared_data_dir

LABELS = shared_data_dir() / "ts_example_ct_sm_seg_flare.nii.gz"
ANISOTROPIC = (0.78, 1.1, 2.5)  # x, y, z: makes a wrong axis order visible

@pytest.fixture(scope="module")
def gt(shared_data) -> np.ndarray:
    return read_label_map(LABELS).array


def eroded(labels: np.ndarray) -> np.ndarray:
    out = np.zeros_like(labels)
    for c in np.unique(labels[labels > 0]):
        out[ndimage.binary_erosion(labels == c)] = c
    return out


def shifted(labels: np.ndarray, shift=(1, -2, 1)) -> np.ndarray:
    return ndimage.shift(labels, shift, order=0, mode="constant", cval=0)


def organ_removed(labels: np.ndarray, organ: int = 3) -> np.ndarray:
    return np.where(labels == organ, 0, labels).astype(labels.dtype)


def mixed(labels: np.ndarray) -> np.ndarray:
    out = shifted(labels, (0, 1, -1))
    out[ndimage.binary_dilation(labels == 1, iterations=2) & (out == 0)] = 1  # liver grown
    out[(labels == 5) & (np.indices(labels.shape)[2] > 20)] = 0  # aorta cut at the top
    out[(labels == 6) & (np.indices(labels.shape)[2] < 5)] = 6  # IVC kept low down
    return out


PERTURBATIONS = {"eroded": eroded, "shifted": shifted, "organ_removed": organ_removed, "mixed": mixed}


def test_real_file_reads_like_nibabel(gt):
    image = nib.load(str(LABELS))
    assert np.array_equal(gt, np.asarray(image.dataobj))
    assert read_label_map(LABELS).spacing == tuple(float(z) for z in image.header.get_zooms())


@pytest.mark.parametrize("name", list(PERTURBATIONS))
@pytest.mark.parametrize("spacing", [(3.0, 3.0, 3.0), ANISOTROPIC])
def test_fast_matches_whole_volume_reference(gt, name, spacing):
    pred = PERTURBATIONS[name](gt)
    results = {}
    for cutoff, inclusive in ((0.2, False), (0.1, True)):
        options = EvaluationOptions(dsc_cutoff=cutoff, inclusive_zrange=inclusive)
        fast = results[cutoff] = evaluate_case(pred, gt, spacing, options)
        ref = reference_score_case(gt, pred, spacing, dsc_cutoff=cutoff, inclusive_zrange=inclusive)
        for s in fast.scores:
            assert abs(s.dsc - ref[s.class_id][0]) <= 1e-4, (name, s, ref[s.class_id])
            assert abs(s.nsd - ref[s.class_id][1]) <= 1e-4, (name, s, ref[s.class_id])
    if name == "organ_removed":
        assert (results[0.2].score(3).dsc, results[0.2].score(3).nsd) == (0.0, 0.0)
    if name == "eroded":
        assert all(s.dsc < 1.0 for s in results[0.2].scores if s.class_id not in (10, 14))
        # left adrenal eroded to DSC 0.1692: NSD cut to 0 at 0.2, computed at the FLARE23 0.1
        assert results[0.2].score(8).dsc == results[0.1].score(8).dsc == 0.1692
        assert results[0.2].score(8).nsd == 0.0 and results[0.1].score(8).nsd > 0.0


def test_folders_with_anisotropic_headers_match_reference_on_nibabel_arrays(gt, tmp_path):
    """Files written with spacing (0.78, 1.1, 2.5), read back by the package (SimpleITK) and by
    nibabel (as the official script): same numbers, so z and the spacing order are right."""
    (tmp_path / "gt").mkdir()
    (tmp_path / "pred").mkdir()
    reference = sitk.ReadImage(str(LABELS))
    for name, perturb in PERTURBATIONS.items():
        for folder, array in (("gt", gt), ("pred", perturb(gt))):
            image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
            image.SetOrigin(reference.GetOrigin())
            image.SetDirection(reference.GetDirection())
            image.SetSpacing(ANISOTROPIC)
            sitk.WriteImage(image, str(tmp_path / folder / f"{name}.nii.gz"))
    run = evaluate_folders(tmp_path / "pred", tmp_path / "gt", workers=2)
    assert [r.case for r in run.results] == sorted(PERTURBATIONS)
    for result in run.results:
        gt_nii = nib.load(str(tmp_path / "gt" / f"{result.case}.nii.gz"))
        spacing = gt_nii.header.get_zooms()
        assert spacing == pytest.approx(ANISOTROPIC)
        gt_array = np.asarray(gt_nii.get_fdata()).astype(np.int8)
        pred_array = np.asarray(nib.load(str(tmp_path / "pred" / f"{result.case}.nii.gz")).get_fdata()).astype(np.int8)
        ref = reference_score_case(gt_array, pred_array, spacing)
        for s in result.scores:
            assert abs(s.dsc - ref[s.class_id][0]) <= 1e-4, (result.case, s)
            assert abs(s.nsd - ref[s.class_id][1]) <= 1e-4, (result.case, s)
