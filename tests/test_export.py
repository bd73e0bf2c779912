"""Networks, nnU-Net import and ONNX export: one-to-one weights, ONNX vs PyTorch errors (fp32 and
fp16) on random and real patches, verification that fails, safe checkpoint loading, plans layouts."""
from __future__ import annotations

import argparse
import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from cli_errors import one_error_line  # noqa: E402

from flare_rt.bundle import Bundle, read_meta  # noqa: E402
from flare_rt.cli import main  # noqa: E402
from flare_rt.errors import ExportVerificationError, ModelError  # noqa: E402
from flare_rt.export import compare, torch_to_onnx, verify  # noqa: E402
from flare_rt.nets import UNetConfig, big_unet_config, small_unet_config  # noqa: E402
from flare_rt.nets.unet import UNet, load_weights  # noqa: E402
from flare_rt.nnunet import architecture_from_config, read_nnunet_model  # noqa: E402
from flare_rt.onnx_graph import initializers, to_fp16, to_fp32  # noqa: E402


@pytest.fixture(scope="module")
def nnunet_net(demo_nnunet_dir):
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    ck = torch.load(demo_nnunet_dir / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    kw = json.loads((demo_nnunet_dir / "plans.json").read_text())["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    net = PlainConvUNet(1, kw["n_stages"], kw["features_per_stage"], torch.nn.Conv3d, kw["kernel_sizes"], kw["strides"],
                        kw["n_conv_per_stage"], 15, kw["n_conv_per_stage_decoder"], True, torch.nn.InstanceNorm3d,
                        {"eps": 1e-5, "affine": True}, None, None, torch.nn.LeakyReLU, {"inplace": True},
                        deep_supervision=False)
    net.load_state_dict(ck["network_weights"])
    return net.eval(), ck["network_weights"]


@pytest.fixture(scope="module")
def real_patch(shared_data, demo_nnunet_dir):
    """A normalised 32x128x192 patch of the real CT at the model's spacing (nnU-Net preprocessing)."""
    import SimpleITK as sitk

    from flare_rt.bundle import ResamplingRule
    from flare_rt.preprocess import compute_new_shape, ct_normalize
    from flare_rt.resample import make_plan, resample

    meta = read_nnunet_model(demo_nnunet_dir).meta
    img = sitk.ReadImage(str(shared_data / "ts_example_ct.nii.gz"))
    arr = sitk.GetArrayFromImage(img)
    sp = tuple(reversed(img.GetSpacing()))
    shape = compute_new_shape(arr.shape, sp, meta.spacing)
    data = resample(ct_normalize(arr, meta.normalization)[None], make_plan(arr.shape, shape, sp, meta.spacing,
                                                                            ResamplingRule(), False))
    z0, y0, x0 = [(s - p) // 2 for s, p in zip(data.shape[1:], meta.patch_size)]
    return np.ascontiguousarray(data[:, z0:z0 + 32, y0:y0 + 128, x0:x0 + 192][None])


def test_unet_matches_plain_conv_unet_one_to_one(nnunet_net):
    ref, weights = nnunet_net
    ours = UNet(small_unet_config())
    load_weights(ours, weights)
    x = torch.randn(1, 1, 32, 128, 192)
    with torch.no_grad():
        assert torch.equal(ours.eval()(x), ref(x))
    assert set(ours.state_dict()) < set(weights)  # ours has no aliases


def test_big_unet_and_deep_supervision():
    cfg = big_unet_config()
    assert cfg.features_per_stage == (32, 64, 128, 256, 320, 320) and cfg.n_conv_per_stage == (3,) * 6
    net = UNet(UNetConfig.from_dict({**cfg.to_dict(), "deep_supervision": True})).eval()
    with torch.no_grad():
        outs = net(torch.randn(1, 1, 16, 64, 64))
    assert [tuple(o.shape[2:]) for o in outs] == [(16, 64, 64), (16, 32, 32), (8, 16, 16), (4, 8, 8), (2, 4, 4)]


def test_weights_that_do_not_fit_are_rejected(nnunet_net):
    _, weights = nnunet_net
    with pytest.raises(ModelError, match="missing"):
        load_weights(UNet(big_unet_config()), weights)


def test_import_writes_self_describing_bundle(fp32_bundle, capsys):
    meta = read_meta(fp32_bundle)
    assert meta.spacing == (4.0, 1.2, 1.2) and meta.patch_size == (32, 128, 192)
    assert meta.labels[1] == "liver" and meta.num_classes == 15
    assert meta.normalization.lower == pytest.approx(-508.1449890136719)
    assert meta.mirror_axes == (0, 1, 2) and meta.orientation == "none" and meta.precision == "fp32"
    assert meta.resampling.data_order == 3 and meta.resampling.prob_order == 1
    assert main(["info", str(fp32_bundle)]) == 0
    out = capsys.readouterr().out
    assert "4 x 1.2 x 1.2 mm" in out and "32 x 128 x 192" in out and "liver" in out


@pytest.mark.parametrize("precision,max_rel", [("fp32", 1e-4), ("fp16", 1e-2)])
def test_onnx_vs_pytorch_on_random_and_real_patches(nnunet_net, fp32_bundle, real_patch, precision, max_rel):
    """Max-abs and relative error of the exported graph against nnU-Net's own PlainConvUNet."""
    import onnxruntime as ort

    ref_net, _ = nnunet_net
    model = Bundle.load(fp32_bundle).load_onnx()
    if precision == "fp16":
        model = to_fp16(model)
    sess = ort.InferenceSession(to_fp32(model).SerializeToString(), providers=["CPUExecutionProvider"])
    rand = np.random.default_rng(0).standard_normal((2, 1, 32, 128, 192)).astype(np.float32)
    for name, x in {"random": rand, "real": real_patch}.items():
        with torch.no_grad():
            ref = ref_net(torch.from_numpy(x)).numpy()
        res = compare(ref, sess.run(None, {"image": x})[0], name)
        print(f"{precision} {res.line()}")
        assert res.rel < max_rel, res.line()
        assert res.agreement > (0.9999 if precision == "fp32" else 0.998), res.line()


def test_fp16_bundle_keeps_instance_norm_in_fp32(fp32_bundle, tmp_path):
    out = tmp_path / "fp16.onnx"
    out.write_bytes(b"an earlier export")  # replaced with --overwrite
    assert main(["export", str(fp32_bundle), str(out), "--precision", "fp16", "--overwrite", "-q"]) == 0
    model = Bundle.load(out).load_onnx()
    inits = initializers(model)
    norm_params = {n for node in model.graph.node if node.op_type == "InstanceNormalization" for n in node.input[1:]}
    producers = {o: node for node in model.graph.node for o in node.output}
    for node in model.graph.node:
        if node.op_type == "InstanceNormalization":
            cast = producers[node.input[0]]
            assert cast.op_type == "Cast" and cast.attribute[0].i == 1  # to float32
    assert norm_params and all(inits[n].dtype == np.float32 for n in norm_params)
    assert all(a.dtype == np.float16 for n, a in inits.items() if n not in norm_params)
    assert 10e6 < out.stat().st_size < 12.5e6  # ~11 MB for the small network: one copy of the weights
    assert read_meta(out).precision == "fp16"


def test_torch_backend_reads_weights_from_the_onnx_bundle(fp32_bundle, nnunet_net):
    from flare_rt.backends import create_backend

    ref_net, _ = nnunet_net
    x = np.random.default_rng(1).standard_normal((1, 1, 32, 128, 192)).astype(np.float32)
    torch.set_num_threads(2)  # the backend below runs with 2 threads: same reduction order, bit-identical
    with torch.no_grad():
        ref = ref_net(torch.from_numpy(x)).numpy()
    tb = create_backend(Bundle.load(fp32_bundle), "torch", "cpu", 2)
    assert np.array_equal(tb(x), ref)  # identical weights, identical arithmetic
    ob = create_backend(Bundle.load(fp32_bundle), "onnxruntime", "cpu", 2)
    assert compare(ref, ob(x), "ort").rel < 1e-4


def test_verification_fails_when_the_graph_disagrees(fp32_bundle, nnunet_net):
    from onnx import numpy_helper

    ref_net, _ = nnunet_net
    model = Bundle.load(fp32_bundle).load_onnx()
    for i, init in enumerate(model.graph.initializer):
        if init.name == "decoder.seg_layers.3.bias":
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) + 0.5, init.name))
    x = {"random": np.random.default_rng(2).standard_normal((1, 1, 32, 128, 192)).astype(np.float32)}
    with pytest.raises(ExportVerificationError, match="disagrees with PyTorch"):
        verify(model, ref_net, x, "fp32")


def test_checkpoint_with_foreign_objects_needs_trust(demo_nnunet_dir, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(demo_nnunet_dir, model_dir)
    ck = torch.load(model_dir / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=True)
    ck["extra"] = argparse.Namespace(a=1)  # a foreign class: not in the weights_only allow-list
    torch.save(ck, model_dir / "fold_0" / "checkpoint_final.pth")
    with pytest.raises(ModelError, match="--trust-checkpoint"):
        read_nnunet_model(model_dir)
    assert read_nnunet_model(model_dir, trust_checkpoint=True).meta.num_classes == 15


def test_old_plans_layout_and_inherits_from(demo_nnunet_dir, tmp_path):
    plans = json.loads((demo_nnunet_dir / "plans.json").read_text())
    cfg = plans["configurations"]["3d_fullres"]
    kw = cfg.pop("architecture")["arch_kwargs"]
    cfg.update(UNet_class_name="PlainConvUNet", UNet_base_num_features=16, unet_max_num_features=320,
               conv_kernel_sizes=kw["kernel_sizes"], pool_op_kernel_sizes=kw["strides"],
               n_conv_per_stage_encoder=kw["n_conv_per_stage"], n_conv_per_stage_decoder=kw["n_conv_per_stage_decoder"])
    plans["configurations"]["3d_child"] = {"inherits_from": "3d_fullres", "patch_size": [32, 128, 128]}
    model_dir = tmp_path / "old"
    shutil.copytree(demo_nnunet_dir, model_dir)
    (model_dir / "plans.json").write_text(json.dumps(plans))
    new = read_nnunet_model(demo_nnunet_dir).meta
    old = read_nnunet_model(model_dir).meta
    assert old.architecture == new.architecture
    child = read_nnunet_model(model_dir, configuration="3d_child").meta
    assert child.patch_size == (32, 128, 128) and child.spacing == new.spacing
    with pytest.raises(ModelError, match="no configuration '2d'"):
        read_nnunet_model(model_dir, configuration="2d")


def test_unsupported_architecture_is_a_clear_error():
    cfg = {"architecture": {"network_class_name": "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
                            "arch_kwargs": {}}}
    with pytest.raises(ModelError, match="ResidualEncoderUNet.*PlainConvUNet only"):
        architecture_from_config(cfg, 15, 1)


def test_bundle_without_metadata_is_rejected(tmp_path):
    net = UNet(UNetConfig(features_per_stage=(4, 8), kernel_sizes=((3, 3, 3),) * 2, strides=((1, 1, 1), (2, 2, 2)),
                          n_conv_per_stage=(1, 1), n_conv_per_stage_decoder=(1,), num_classes=3))
    import onnx

    path = tmp_path / "plain.onnx"
    onnx.save(torch_to_onnx(net, (8, 8, 8)), str(path))
    with pytest.raises(ModelError, match="no flare-rt metadata"):
        Bundle.load(path)
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf at all" * 10)
    with pytest.raises(ModelError, match="not a readable ONNX file"):
        Bundle.load(tmp_path / "junk.onnx")


def _broken_model(demo_nnunet_dir, tmp_path, name="model"):
    model_dir = tmp_path / name
    shutil.copytree(demo_nnunet_dir, model_dir)
    return model_dir


@pytest.mark.parametrize("plans, words", [
    ([1, 2], "plans.json: expected a JSON object, found a list"),
    ("no-foreground", "missing key 'foreground_intensity_properties_per_channel'"),
])
def test_malformed_plans_are_a_model_error(demo_nnunet_dir, tmp_path, capsys, plans, words):
    model_dir = _broken_model(demo_nnunet_dir, tmp_path)
    if plans == "no-foreground":
        plans = json.loads((model_dir / "plans.json").read_text())
        del plans["foreground_intensity_properties_per_channel"]
    (model_dir / "plans.json").write_text(json.dumps(plans))
    rc = main(["import-nnunet", str(model_dir), str(tmp_path / "b.onnx"), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == ModelError.exit_code and len(err) == 1 and words in err[0], err
    assert not (tmp_path / "b.onnx").exists()


@pytest.mark.parametrize("content", [b"", b"not a checkpoint, just text\n", "truncated"])
@pytest.mark.parametrize("trust", [False, True])
def test_damaged_checkpoint_is_a_model_error(demo_nnunet_dir, tmp_path, content, trust):
    model_dir = _broken_model(demo_nnunet_dir, tmp_path)
    ckpt = model_dir / "fold_0" / "checkpoint_final.pth"
    ckpt.write_bytes(ckpt.read_bytes()[: 1 << 20] if content == "truncated" else content)
    expected = "the checkpoint is empty" if content == b"" else "not a readable PyTorch checkpoint"
    with pytest.raises(ModelError, match=expected) as info:
        read_nnunet_model(model_dir, trust_checkpoint=trust)
    assert "--trust-checkpoint" not in str(info.value)  # trusting a damaged file does not help


def test_missing_checkpoint_name_lists_those_present(demo_nnunet_dir, tmp_path):
    with pytest.raises(ModelError, match=r"no fold_\*/checkpoint_best.pth found; checkpoints present: "
                                         r"\['fold_0/checkpoint_final.pth'\]"):
        read_nnunet_model(demo_nnunet_dir, checkpoint="checkpoint_best.pth")


def test_output_that_cannot_be_written_is_refused_before_the_import(demo_nnunet_dir, fp32_bundle, tmp_path, capsys,
                                                                     monkeypatch):
    monkeypatch.setattr("flare_rt.nnunet.read_nnunet_model", lambda *a, **k: pytest.fail("imported first"))
    monkeypatch.setattr("flare_rt.nets.network_from_bundle", lambda *a, **k: pytest.fail("exported first"))
    blocker = tmp_path / "afile"
    blocker.write_text("")
    for argv in (["import-nnunet", str(demo_nnunet_dir)], ["export", str(fp32_bundle)]):
        rc = main([*argv, str(blocker / "out.onnx"), "-q"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 8 and len(err) == 1 and f"{blocker}: cannot write" in err[0] and "not a folder" in err[0], err


@pytest.mark.parametrize("command", ["import-nnunet", "export", "quantize"])
def test_an_existing_output_or_the_input_is_refused_before_any_work(command, demo_nnunet_dir, fp32_bundle, tmp_path,
                                                                   capsys, monkeypatch):
    """Model-writing commands, like segment: an existing output only with --overwrite, never the input."""
    for name in ("flare_rt.nnunet.read_nnunet_model", "flare_rt.bundle.Bundle.load"):
        monkeypatch.setattr(name, lambda *a, **k: pytest.fail("read the model before checking the output"))
    source = demo_nnunet_dir if command == "import-nnunet" else fp32_bundle
    extra = ["--precision", "int8"] if command == "quantize" else []
    earlier = tmp_path / "earlier.onnx"
    earlier.write_bytes(b"an earlier bundle")
    rc = main([command, str(source), str(earlier), *extra, "-q"])
    assert rc == 8
    line = one_error_line(capsys)
    assert f"{earlier}: exists; pass --overwrite to replace it" in line
    assert earlier.read_bytes() == b"an earlier bundle"
    if command != "import-nnunet":  # a bundle exported over itself, however spelled, even with --overwrite
        same = fp32_bundle.parent / ".." / fp32_bundle.parent.name / fp32_bundle.name
        before = fp32_bundle.read_bytes()
        rc = main([command, str(fp32_bundle), str(same), *extra, "--overwrite", "-q"])
        assert rc == 8 and "output would overwrite the input" in one_error_line(capsys)
        assert fp32_bundle.read_bytes() == before
    folder = tmp_path / "folder.onnx"
    folder.mkdir()
    rc = main([command, str(source), str(folder), *extra, "--overwrite", "-q"])
    assert rc == 8 and f"{folder}: is a folder" in one_error_line(capsys)


def identity_onnx_with_metadata(path, metadata: str):
    """A one-node ONNX file whose flare-rt metadata is ``metadata``, as it stands."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph)
    model.metadata_props.add(key="flare_rt", value=metadata)
    onnx.save(model, str(path))


def test_bundle_with_malformed_or_empty_metadata_is_a_model_error(tmp_path, capsys):
    identity_onnx_with_metadata(tmp_path / "list.onnx", "[1, 2]")
    (tmp_path / "empty.onnx").write_bytes(b"")
    for name, words in (("list.onnx", "malformed flare-rt metadata"), ("empty.onnx", "is empty (0 bytes)")):
        rc = main(["info", str(tmp_path / name)])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == ModelError.exit_code and len(err) == 1 and words in err[0], err


@pytest.mark.parametrize("orientation", ["sideways", "lps", "LLS", 3])
def test_bundle_with_an_unknown_orientation_is_a_model_error(tmp_path, capsys, orientation):
    """The runtime would otherwise fail on it mid-inference with a KeyError."""
    from flare_rt.resources import packaged_model

    meta = json.loads(Bundle.load(packaged_model()).meta.to_json())
    meta["orientation"] = orientation
    identity_onnx_with_metadata(tmp_path / "m.onnx", json.dumps(meta))
    rc = main(["info", str(tmp_path / "m.onnx")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == ModelError.exit_code and len(err) == 1, err
    assert f"orientation {orientation!r}" in err[0] and "'stored'" in err[0], err
