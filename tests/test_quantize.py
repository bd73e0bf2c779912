"""``flare-rt quantize``: int8 calibrated on a real CT folder (the DICOM patient), bf16, the records
they keep, how `auto` and the other backends treat them, and each bad input."""
from __future__ import annotations

import importlib.util
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from flare_rt.backends import create_backend
from flare_rt.bundle import VARIANT_FORMAT_VERSION, Bundle
from flare_rt.cli import main
from flare_rt.errors import BackendUnavailableError, ConfigError, InputImageError, ModelError, OutputError
from flare_rt.precision import sha256_path
from flare_rt.quantize import QuantizeOptions, calibration_tiles, find_cts, quantize


@pytest.fixture(autouse=True, scope="module")
def openvino_extra():
    """CI installs the openvino extra (OpenVINO, NNCF): fail, not skip, without it."""
    missing = [m for m in ("openvino", "nncf") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} not installed: pip install -e '.[openvino]'", pytrace=False)



@pytest.fixture(scope="module")
def int8_bundle(fp32_bundle, shared_data, small_ct_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("int8") / "int8.onnx"
    quantize(fp32_bundle, out, QuantizeOptions("int8", max_patches=4, threads=2), shared_data / "ts_dicom",
             [small_ct_path])
    return Bundle.load(out)


def one_line_error(capsys, rc: int, code: int, *words: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == code and len(err) == 1, err
    for w in words:
        assert w in err[0], err[0]
    return err[0]


def test_int8_records_calibration_and_agreement(int8_bundle, shared_data, small_ct_path, fp32_bundle, capsys):
    meta = int8_bundle.meta
    rec = meta.precision_record
    assert meta.precision == "int8" and meta.format_version == VARIANT_FORMAT_VERSION
    assert rec.calibration == (sha256_path(shared_data / "ts_dicom"),) and rec.calibration[0].name == "ts_dicom"
    assert rec.reference == sha256_path(fp32_bundle) and rec.backend == "openvino"
    assert rec.options["patches"] == 4 and rec.options["fp32_nodes"]
    (check,) = rec.checks
    assert check.case == sha256_path(small_ct_path)
    assert check.dice and all(0 <= d <= 1 for d in check.dice.values()) and check.min_voxels == 1000
    assert 0.5 < check.network_agreement <= 1 and 0.5 < check.voxel_agreement <= 1
    # a QDQ graph whose output convolution stayed fp32
    graph = int8_bundle.load_onnx().graph
    assert sum(n.op_type == "QuantizeLinear" for n in graph.node) >= 18
    last = [n for n in graph.node if n.op_type == "Conv"][-1]
    producers = {o: n.op_type for n in graph.node for o in n.output}
    assert producers.get(last.input[1]) != "DequantizeLinear"
    # convolution outputs stay fp32: each InstanceNorm normalises what a convolution computed, unquantised
    norms = [n for n in graph.node if n.op_type == "InstanceNormalization"]
    assert norms and all(producers[n.input[0]] in ("Conv", "ConvTranspose") for n in norms)
    assert main(["info", str(int8_bundle.path)]) == 0
    out = capsys.readouterr().out
    assert "precision   int8" in out and "calibration ts_dicom" in out
    assert f"agreement   {small_ct_path.name}" in out and "auto        does not use this precision" in out


def test_int8_runs_in_openvino_and_onnxruntime_close_to_fp32(int8_bundle, fp32_bundle, example_ct_path):
    tiles = calibration_tiles(int8_bundle, [example_ct_path], 2)
    ref = create_backend(Bundle.load(fp32_bundle), "onnxruntime", "cpu", 2)(tiles)
    for name in ("openvino", "onnxruntime"):
        b = create_backend(int8_bundle, name, "cpu", 2)
        out = b(tiles)
        agreement = float((out.argmax(1) == ref.argmax(1)).mean())
        # int8 arithmetic: close to fp32, not equal to it (0.991 here; 0.971 when the convolutions' outputs were
        # quantised too, before the InstanceNorms that magnify their error)
        assert 0.98 < agreement < 1.0, (name, agreement)
    assert create_backend(int8_bundle, "openvino", "cpu", 1).compute == "int8"


def test_auto_refuses_an_unproven_int8_bundle(int8_bundle):
    with pytest.raises(ModelError, match=r"auto does not run this int8 bundle \(1 check case\(s\) recorded, 2 needed\)"):
        create_backend(int8_bundle, "auto", "cpu")


def test_quantised_bundle_is_refused_by_torch_tensorrt_and_export(int8_bundle, capsys, tmp_path, small_ct_path):
    with pytest.raises(BackendUnavailableError, match="the torch backend cannot run it"):
        create_backend(int8_bundle, "torch", "cpu")
    with pytest.raises(BackendUnavailableError, match="'int8' bundle; the tensorrt backend builds fp16 or fp32"):
        create_backend(int8_bundle, "tensorrt", "cuda")  # refused before TensorRT or a GPU is needed
    rc = main(["segment", str(small_ct_path), str(tmp_path / "s.nii.gz"), "--model", str(int8_bundle.path),
               "--backend", "torch", "-q"])
    one_line_error(capsys, rc, BackendUnavailableError.exit_code, "int8 (quantised) bundle", "torch backend")
    rc = main(["export", str(int8_bundle.path), str(tmp_path / "e.onnx"), "-q"])
    one_line_error(capsys, rc, ModelError.exit_code, "int8 (quantised) bundle", "export", "fp32 bundle")
    assert not (tmp_path / "e.onnx").exists()
    rc = main(["quantize", str(int8_bundle.path), str(tmp_path / "q.onnx"), "--precision", "bf16", "-q"])
    one_line_error(capsys, rc, ModelError.exit_code, "already a int8 variant")


def test_bf16_variant(fp32_bundle, small_ct_path, tmp_path):
    from flare_rt.backends.openvino import cpu_has_bf16

    out = tmp_path / "bf16.onnx"
    if not cpu_has_bf16():
        with pytest.raises(BackendUnavailableError, match="no bf16 instructions"):
            quantize(fp32_bundle, out, QuantizeOptions("bf16", threads=2), None, [small_ct_path])
        return
    quantize(fp32_bundle, out, QuantizeOptions("bf16", threads=2), None, [small_ct_path])
    b = Bundle.load(out)
    assert b.meta.precision == "bf16" and b.meta.precision_record.calibration == ()
    assert b.meta.precision_record.checks[0].case.name == small_ct_path.name
    ov = create_backend(b, "openvino", "cpu", 2)
    assert ov.compute == "bf16" and ov.inference_precision == "bf16"
    # the same weights: ONNX Runtime and torch compute it in fp32; auto too while unproven
    assert create_backend(b, "onnxruntime", "cpu", 2).name == "onnxruntime"
    auto = create_backend(b, "auto", "cpu", 2)
    assert (auto.name, auto.compute) == ("openvino", "fp32")


def test_calibration_takes_a_study_folder_per_patient(shared_data, small_ct_path, tmp_path):
    """Each sub-folder holding a DICOM series at any depth is one CT (a study as exported), beside image files."""
    folder = tmp_path / "calibration"
    shutil.copytree(shared_data / "ts_dicom", folder / "patient1" / "CT" / "SE1")
    (folder / "notes").mkdir()
    shutil.copy(small_ct_path, folder / "patient2.nii.gz")
    assert find_cts(folder) == [folder / "patient1", folder / "patient2.nii.gz"]


def test_empty_calibration_folder_is_named(fp32_bundle, tmp_path, capsys, small_ct_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    with pytest.raises(InputImageError, match=f"--calibration {empty}: no CT images"):
        find_cts(empty)
    rc = main(["quantize", str(fp32_bundle), str(tmp_path / "q.onnx"), "--precision", "int8", "--calibration",
               str(empty), "--check", str(small_ct_path), "-q"])
    one_line_error(capsys, rc, InputImageError.exit_code, str(empty), "no CT images")
    assert not (tmp_path / "q.onnx").exists()


def test_non_ct_calibration_folder_is_named(fp32_bundle, tmp_path, capsys, small_ct_path):
    mr = tmp_path / "mr"
    mr.mkdir()
    img = sitk.GetImageFromArray(np.random.default_rng(0).uniform(0, 800, (20, 64, 64)).astype(np.float32))
    sitk.WriteImage(img, str(mr / "t1.nii.gz"))
    rc = main(["quantize", str(fp32_bundle), str(tmp_path / "q.onnx"), "--precision", "int8", "--calibration",
               str(mr), "--check", str(small_ct_path), "-q"])
    line = one_line_error(capsys, rc, InputImageError.exit_code, f"--calibration {mr}", "t1.nii.gz",
                          "do not look like CT")
    assert line.startswith("flare-rt: error: ")


def test_non_ct_check_is_named_without_offering_force(fp32_bundle, tmp_path, capsys, shared_data):
    """quantize has no --force: a --check image that is not CT is refused as a --check, without the hint."""
    labels = shared_data / "ts_example_ct_sm_seg_flare.nii.gz"
    rc = main(["quantize", str(fp32_bundle), str(tmp_path / "q.onnx"), "--precision", "bf16", "--check",
               str(labels), "-q"])
    line = one_line_error(capsys, rc, InputImageError.exit_code, f"--check {labels}: intensities do not look like CT")
    assert "--force" not in line
    assert not (tmp_path / "q.onnx").exists()


def test_unknown_backend_is_refused(fp32_bundle, tmp_path, capsys, small_ct_path):
    with pytest.raises(ConfigError, match="--backend must be one of .*'openvino', 'onnxruntime'.*got 'bogus'"):
        QuantizeOptions("int8", backend="bogus")
    with pytest.raises(SystemExit):  # argparse: the choices
        main(["quantize", str(fp32_bundle), str(tmp_path / "q.onnx"), "--precision", "int8", "--backend", "bogus"])
    assert "invalid choice: 'bogus'" in capsys.readouterr().err


def test_output_that_cannot_be_written_is_refused_before_calibrating(fp32_bundle, tmp_path, capsys, shared_data,
                                                                      small_ct_path, monkeypatch):
    monkeypatch.setattr("flare_rt.quantize.calibration_tiles", lambda *a, **k: pytest.fail("calibrated first"))
    blocker = tmp_path / "afile"
    blocker.write_text("")
    rc = main(["quantize", str(fp32_bundle), str(blocker / "q.onnx"), "--precision", "int8", "--calibration",
               str(shared_data / "ts_dicom"), "--check", str(small_ct_path), "-q"])
    line = one_line_error(capsys, rc, OutputError.exit_code, f"{blocker}: cannot write", "is not a folder")
    assert line.startswith("flare-rt: error: ") and blocker.read_text() == ""


def test_calibration_folder_listing_prints_no_library_warnings(tmp_path, capfd):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "notes.txt").write_text("")
    capfd.readouterr()
    with pytest.raises(InputImageError, match="no CT images"):
        find_cts(empty)
    assert capfd.readouterr().err == ""


def test_calibration_must_not_hold_a_check_case(fp32_bundle, tmp_path, capsys, small_ct_path):
    folder = tmp_path / "cal"
    folder.mkdir()
    (folder / small_ct_path.name).write_bytes(small_ct_path.read_bytes())
    rc = main(["quantize", str(fp32_bundle), str(tmp_path / "q.onnx"), "--precision", "int8", "--calibration",
               str(folder), "--check", str(small_ct_path), "-q"])
    one_line_error(capsys, rc, 6, "holds a --check case")


def test_nncf_method_gives_a_qdq_graph_close_to_fp32(fp32_bundle, example_ct_path):
    import onnxruntime as ort

    from flare_rt.onnx_graph import to_fp32
    from flare_rt.quantize import quantize_int8

    b = Bundle.load(fp32_bundle)
    tiles = calibration_tiles(b, [example_ct_path], 2)
    q, method, settings = quantize_int8(to_fp32(b.load_onnx()), tiles, b.meta.input_name,
                                        QuantizeOptions("int8", method="nncf"))
    assert method.startswith("NNCF") and settings["patches"] == 2
    assert any(n.op_type == "QuantizeLinear" for n in q.graph.node)
    assert q.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    run = {m: ort.InferenceSession(g.SerializeToString(), providers=["CPUExecutionProvider"])
           for m, g in (("fp32", b.load_onnx()), ("int8", q))}
    out = {m: s.run(None, {"image": tiles})[0] for m, s in run.items()}
    agreement = float((out["fp32"].argmax(1) == out["int8"].argmax(1)).mean())
    assert 0.8 < agreement < 1.0, agreement
