"""The OpenVINO backend against ONNX Runtime (fp32 export tolerances), its precision hint, and the
graph transform it relies on."""
from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest

from flare_rt.backends import create_backend
from flare_rt.bundle import Bundle
from flare_rt.cli import main
from flare_rt.errors import BackendUnavailableError
from flare_rt.export import TOLERANCES, compare
from flare_rt.onnx_graph import pool_plan, pooled_instance_norm
from flare_rt.quantize import calibration_tiles

FP32 = TOLERANCES["fp32"]



@pytest.fixture(scope="module")
def bundle(fp32_bundle):
    if importlib.util.find_spec("openvino") is None:  # CI installs the extra: fail, not skip
        pytest.fail("openvino is not installed: pip install -e '.[openvino]'", pytrace=False)
    return Bundle.load(fp32_bundle)


@pytest.fixture(scope="module")
def real_tiles(bundle, example_ct_path):
    """Tiles of the example CT exactly as the pipeline feeds them to the network."""
    return calibration_tiles(bundle, [example_ct_path], 3)


@pytest.fixture(scope="module")
def pair(bundle):
    ov = create_backend(bundle, "openvino", "cpu", threads=2)
    ort = create_backend(bundle, "onnxruntime", "cpu", threads=2)
    yield ov, ort
    ov.close()
    ort.close()


def test_fp32_is_asked_for_and_compiled(pair):
    ov, _ = pair
    assert ov.compute == "fp32" and ov.inference_precision == "f32"
    assert ov.describe().startswith("openvino ") and "(fp32, 2 threads)" in ov.describe()


def test_matches_onnxruntime_on_random_patches_within_the_fp32_export_tolerance(bundle, pair):
    ov, ort = pair
    x = np.random.default_rng(0).standard_normal((2, 1, *bundle.meta.patch_size), dtype=np.float32)
    for batch in (x[:1], x):  # batch 1 and 2 (compiled per batch size)
        res = compare(ort(batch), ov(batch), f"random b{len(batch)}")
        assert res.max_abs <= FP32.atol + FP32.rtol * res.ref_max, res.line()
        assert res.agreement >= FP32.min_agreement, res.line()


def test_matches_onnxruntime_on_real_patches(bundle, pair, real_tiles):
    """On real CT tiles both fp32 runtimes drift from exact arithmetic by more than the export
    check's logit tolerance (sums over 786k voxels per InstanceNorm channel in fp32), so the logits
    are held to a float64 reference: OpenVINO (short-sum InstanceNorm statistics) no further from it
    than ONNX Runtime, and the
    labels to the fp32 argmax agreement of the export check."""
    import torch

    from flare_rt.nets import network_from_bundle

    ov, ort = pair
    net = network_from_bundle(bundle).double()
    for i, tile in enumerate(real_tiles[1:]):  # two tiles: float64 3D convolutions are slow
        x = tile[None]
        with torch.no_grad():
            exact = net(torch.from_numpy(x).double()).numpy()
        a, b = ov(x), ort(x)
        err_ov, err_ort = np.abs(a - exact).max(), np.abs(b - exact).max()
        assert err_ov <= err_ort + FP32.atol, f"tile {i}: openvino {err_ov:.3g}, onnxruntime {err_ort:.3g}"
        res = compare(b, a, f"real tile {i}")
        assert res.agreement >= FP32.min_agreement, res.line()


def test_pool_plan_takes_short_sums():
    assert pool_plan((32, 128, 192)) == [(4, 4, 4), (4, 4, 4)]  # 64-term sums, then a mean of 192
    assert pool_plan((48, 224, 224)) == [(4, 4, 4), (4, 4, 4)]  # the big model's patch
    assert pool_plan((40, 160, 160)) == [(4, 4, 4), (2, 4, 4)]
    assert pool_plan((2, 8, 12)) == []  # small enough for one mean
    assert pool_plan((131, 97, 89)) == []  # prime sizes: nothing divides, one long mean (the native op's sum)


def test_pooled_instance_norm_is_the_same_function(bundle):
    """The full-resolution InstanceNorms rewritten with hierarchical statistics compute the same
    normalisation (checked on ONNX Runtime, whose own InstanceNorm is the reference)."""
    import onnxruntime as ort

    model = bundle.load_onnx()
    pooled = pooled_instance_norm(model)
    kinds = [n.op_type for n in pooled.graph.node]
    before = [n.op_type for n in model.graph.node].count("InstanceNormalization")
    assert before - kinds.count("InstanceNormalization") == 4  # the two full-resolution stages of encoder and decoder
    assert kinds.count("AveragePool") == 4 * 2 * 2  # 4 layers x (mean, variance) x 2 pooling passes
    assert pooled_instance_norm(model, min_voxels=10**9) is model
    x = np.random.default_rng(1).standard_normal((1, 1, *bundle.meta.patch_size), dtype=np.float32)
    outs = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
            for m in (model, pooled)]
    np.testing.assert_allclose(outs[0], outs[1], atol=2e-3, rtol=0)


def test_fp16_bundle_is_computed_in_fp32(real_tiles):
    from flare_rt.resources import packaged_model

    b = Bundle.load(packaged_model())
    ov = create_backend(b, "openvino", "cpu", threads=2)
    ort = create_backend(b, "onnxruntime", "cpu", threads=2)
    assert ov.compute == "fp32" and ov.inference_precision == "f32"
    res = compare(ort(real_tiles[:1]), ov(real_tiles[:1]), "fp16 bundle")
    assert res.agreement >= FP32.min_agreement, res.line()


def test_auto_picks_openvino_fp32_for_an_fp32_bundle(bundle):
    b = create_backend(bundle, "auto", "cpu", threads=1)
    assert b.name == "openvino" and b.compute == "fp32"


def test_missing_openvino_says_how_to_install(bundle, monkeypatch, capsys, small_ct_path, tmp_path):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino -> ImportError
    with pytest.raises(BackendUnavailableError, match=r"pip install 'flare-rt\[openvino\]'"):
        create_backend(bundle, "openvino", "cpu")
    rc = main(["segment", str(small_ct_path), str(tmp_path / "o.nii.gz"), "--model", str(bundle.path),
               "--backend", "openvino", "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == BackendUnavailableError.exit_code and len(err) == 1
    assert "openvino" in err[0] and "pip install" in err[0]
    assert not (tmp_path / "o.nii.gz").exists()
    # auto goes on to the next backend
    assert create_backend(bundle, "auto", "cpu").name == "onnxruntime"
