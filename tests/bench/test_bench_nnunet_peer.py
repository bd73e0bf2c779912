"""nnU-Net's predictor as the benchmark peer where SimpleITK is missing (the GPU check machine), and its
model folder rebuilt from a flare-rt bundle's weights."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import nnunet_peer
from measure import read_labels

BENCH = Path(nnunet_peer.__file__).parent

HIDDEN = ("import runpy, sys; sys.modules['SimpleITK'] = None; sys.argv = sys.argv[1:]; "
          "runpy.run_path(sys.argv[0], run_name='__main__')")


def run_peer(image, out, model_dir, *extra, hide_simpleitk=False):
    report = out.with_suffix(".json")
    cmd = [str(BENCH / "nnunet_peer.py"), str(image), str(out), "--model-dir", str(model_dir), "--report", str(report),
           "--threads", "2", *extra]
    cmd = [sys.executable, "-c", HIDDEN, *cmd] if hide_simpleitk else [sys.executable, *cmd]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(report.read_text())


@pytest.mark.slow
def test_without_simpleitk_nibabelio_writes_the_same_labels(tmp_path, tiny_ct, demo_nnunet_dir):
    ref = run_peer(tiny_ct, tmp_path / "sitk.nii.gz", demo_nnunet_dir, "--io", "simpleitk")
    got = run_peer(tiny_ct, tmp_path / "nib.nii.gz", demo_nnunet_dir, hide_simpleitk=True)  # --io auto
    assert (ref["io"], ref["simpleitk_stand_in"]) == ("SimpleITKIO", False)
    assert (got["io"], got["simpleitk_stand_in"]) == ("NibabelIO", True)
    assert got["device"] == "cpu" and got["tiles"] == ref["tiles"] == 2
    a, b = read_labels(tmp_path / "sitk.nii.gz"), read_labels(tmp_path / "nib.nii.gz")
    assert a.shape == (12, 60, 60) and len(np.unique(a)) > 1
    np.testing.assert_array_equal(a, b)


def test_stand_in_fails_loudly_on_use(monkeypatch):
    monkeypatch.setitem(sys.modules, "SimpleITK", None)
    assert nnunet_peer.install_simpleitk_stand_in()
    import SimpleITK

    assert not hasattr(SimpleITK, "ReadImage")  # probes see an AttributeError ...
    with pytest.raises(nnunet_peer.StandInUsed, match="SimpleITK.ReadImage was used but SimpleITK is not installed"):
        SimpleITK.ReadImage("x.nii.gz")  # ... and a real use says why
    with pytest.raises(SystemExit, match="--io simpleitk but SimpleITK is not installed"):
        nnunet_peer.pick_io("simpleitk", simpleitk_installed=False)
    assert nnunet_peer.pick_io("auto", simpleitk_installed=False) == "NibabelIO"
    assert nnunet_peer.pick_io("auto", simpleitk_installed=True) == "SimpleITKIO"


@pytest.mark.slow
def test_model_folder_rebuilt_from_a_bundle_loads_in_nnunet(tmp_path, demo_nnunet_dir):
    import torch

    import nnunet_folder
    from flare_rt.bundle import Bundle
    from flare_rt.nets import network_from_bundle
    from flare_rt.resources import packaged_model

    out = nnunet_folder.rebuild(packaged_model(), demo_nnunet_dir, tmp_path / "model", fold="0")
    assert sorted(p.name for p in out.iterdir()) == ["dataset.json", "fold_0", "plans.json"]
    nnunet_peer._env(1)
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(use_mirroring=False, perform_everything_on_device=False, device=torch.device("cpu"),
                                allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(out), use_folds=(0,))
    predictor.network.load_state_dict(predictor.list_of_parameters[0])  # as its sliding window does
    ours = network_from_bundle(Bundle.load(packaged_model()))
    x = torch.randn(1, 1, 32, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (predictor.network(x) - ours(x)).abs().max().item()
    assert diff < 1e-5
    ckpt = torch.load(out / "fold_0" / "checkpoint_final.pth", weights_only=False)
    assert ckpt["trainer_name"] == "nnUNetTrainer" and ckpt["init_args"]["configuration"] == "3d_fullres"
    assert "fp16" in ckpt["rebuilt_from"]
