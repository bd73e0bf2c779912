"""End to end on real CTs: train the tiny network on one patient (NIfTI), validate on another (a DICOM
series), and segment with the exported bundle through ``flare-rt segment``.

Short-run settings, stated here because they differ from the paper's defaults:
- ``orientation="LPS"``: the two patients are stored in different orientations (the NIfTI with
  direction diag(-1, -1, 1), the DICOM in LPS), so in stored array order left and right swap and the
  spleen would sit where the liver was trained; reorienting both (the runtime does the same from the
  bundle's metadata) keeps anatomy consistent. For the same reason mirroring is off.
- SGD momentum 0.9 with lr 0.1 (the same lr / (1 - momentum) as the paper's 0.01 / 0.99, but a 10x
  shorter memory): with 0.99 the tiny network learns only the liver in the first ~600 iterations.
- half the patches centred on a class (paper: a third), so the spleen is seen often in 320 iterations.
Measured here (2-core CPU, 1 thread, ~100 s of training): Dice on the whole DICOM liver 0.00 -> 0.73,
spleen 0.00 -> 0.23; online validation patches liver 0.01 -> 0.65, spleen 0.01 -> 0.19. The DICOM is
contrast-enhanced and the training scan is not: both organs sit at the CT clip's upper bound there,
which caps what one training patient can teach about the spleen.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from flare_rt.bundle import Bundle, read_meta
from flare_rt.cli import main as cli_main
from flare_rt.io import load_volume, read_image
from flare_rt.labels import NAMES
from flare_rt.pipeline import SegmentOptions, Segmenter
from flare_rt.train import (AugmentConfig, DataConfig, OptimConfig, RuntimeConfig, ScheduleConfig, TinyModel,
                            TrainConfig, index_from_pairs, prepare, save_index, train)
from flare_rt.train.release import bundle_meta
from flare_rt.train.loop import validation_scores
from flare_rt.train.model import init_network, inference_network
from agreement import dice

pytestmark = pytest.mark.slow

LIVER, SPLEEN = 1, 3
EPOCHS, ITERATIONS = 8, 40


@pytest.fixture(scope="module")
def dicom_label(real_data, tmp_path_factory):
    """The DICOM's label resampled onto the DICOM grid in physical space (it is stored flipped in y)."""
    dicom = read_image(real_data / "ts_dicom")
    label = sitk.ReadImage(str(real_data / "ts_dicom_seg_flare.nii.gz"))
    onto = sitk.Resample(label, dicom, sitk.Transform(), sitk.sitkNearestNeighbor, 0, label.GetPixelID())
    arr, stored = sitk.GetArrayFromImage(onto), sitk.GetArrayFromImage(label)
    assert np.array_equal(arr, stored[:, ::-1, :])  # the physical-space resampling is exactly the y flip
    path = tmp_path_factory.mktemp("dicom_label") / "ts_dicom_seg.nii.gz"
    sitk.WriteImage(onto, str(path))
    return path


def segment_with(net, meta, dicom: Path) -> np.ndarray:
    """The runtime's Segmenter with a PyTorch network as its backend (the strategy takes any callable)."""
    import torch

    net = net.eval()

    def backend(batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return net(torch.from_numpy(np.ascontiguousarray(batch))).numpy()

    return Segmenter(Bundle(Path("in-memory"), meta), backend, SegmentOptions()).predict(load_volume(dicom)).labels


def test_tiny_network_learns_liver_and_spleen_and_its_bundle_segments(real_data, dicom_label, tmp_path):
    # TotalSegmentator labels every organ it finds: classes absent from the scan are absent, not unannotated
    index = index_from_pairs([("patient_a", real_data / "ts_example_ct_sm.nii.gz",
                               real_data / "ts_example_ct_sm_seg_flare.nii.gz"),
                              ("patient_b", real_data / "ts_dicom", dicom_label)],
                             annotations={"patient_a": range(15)})
    assert index.case("patient_b").annotated == (0, 1, 3, 4, 5, 6, 7, 11)  # inferred from its 7 organs
    config = TrainConfig(
        name="tiny-real", model=TinyModel(orientation="LPS"),
        data=DataConfig(index=str(save_index(index, tmp_path / "index.json")), cache=str(tmp_path / "cache"),
                        train_cases=("patient_a",), val_cases=("patient_b",), preprocess_workers=1),
        output=str(tmp_path / "run"),
        schedule=ScheduleConfig(epochs=EPOCHS, iterations_per_epoch=ITERATIONS, val_iterations=8,
                                oversample_foreground=0.5, checkpoint_every=EPOCHS),
        optim=OptimConfig(lr=0.1, momentum=0.9), augment=AugmentConfig(p_mirror=0.0),
        runtime=RuntimeConfig(num_workers=1, progress=False, export=True, seed=0))
    prepared = prepare(config, progress=False)
    gt = sitk.GetArrayFromImage(sitk.ReadImage(str(dicom_label)))

    # before training: online validation and the whole DICOM through the runtime
    untrained_net = init_network(config.model, 15, seed=config.runtime.seed)
    _, untrained = validation_scores(untrained_net, config, prepared)
    meta = bundle_meta(config, prepared.fingerprint, 1)
    before = segment_with(inference_network(untrained_net), meta, real_data / "ts_dicom")

    result = train(config, prepared=prepared)
    trained = result.history[-1].val_dice
    for k in (LIVER, SPLEEN):
        assert not math.isnan(untrained[k]) and not math.isnan(trained[k])
    assert math.isnan(trained[2])  # the right kidney is not annotated in patient_b: not scored

    bundle = read_meta(result.bundle)
    fp = result.fingerprint
    assert bundle.labels == NAMES and bundle.spacing == (4.0, 2.4, 2.4) and bundle.patch_size == (16, 64, 64)
    assert (bundle.normalization.mean, bundle.normalization.lower) == (fp.mean, fp.percentile_00_5)
    assert bundle.mirror_axes == (0, 1) and bundle.orientation == "LPS" and bundle.precision == "fp32"  # LPS: x is L-R

    out = tmp_path / "patient_b.nii.gz"
    assert cli_main(["segment", str(real_data / "ts_dicom"), str(out), "--model", str(result.bundle),
                     "--threads", "1", "-q"]) == 0
    after = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
    assert after.shape == before.shape == gt.shape
    whole = {k: (dice(before == k, gt == k), dice(after == k, gt == k)) for k in (LIVER, SPLEEN)}
    assert whole[LIVER][1] > max(0.6, whole[LIVER][0] + 0.4), whole
    assert whole[SPLEEN][1] > whole[SPLEEN][0] + 0.12, whole
    assert trained[LIVER] > untrained[LIVER] + 0.3, (untrained[LIVER], trained[LIVER])
    assert trained[SPLEEN] > untrained[SPLEEN] + 0.08, (untrained[SPLEEN], trained[SPLEEN])
