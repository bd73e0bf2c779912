"""The tensorrt backend through the registry: its interface (CuPy arrays, fp16 input, batch profile
from --batch-size), the one-line errors when TensorRT, a GPU or a usable engine is missing, and the
fallback under --backend auto with a log line. The whole production path imports no torch."""
from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from trt_doubles import FAKES

from flare_rt.backends import create_backend
from flare_rt.backends.tensorrt import TensorRTBackend
from flare_rt.bundle import Bundle, write_bundle
from flare_rt.cli import main
from flare_rt.errors import BackendUnavailableError
from flare_rt.precision import CPU_ORDER, CaseAgreement, FileHash, PrecisionRecord

REPO = Path(__file__).resolve().parents[2]
#: the CPU backend auto falls back to (the first installed of the fixed CPU order)
CPU_FIRST = next(b for b in CPU_ORDER if importlib.util.find_spec(b) is not None)


def test_the_backend_plugs_into_the_registry(gpu_stack, packaged_bundle):
    stack = gpu_stack()
    b = create_backend(packaged_bundle, "tensorrt", "cuda", batch_size=3)
    assert b.name == "tensorrt" and b.xp is stack.cp and b.input_dtype == np.float16
    assert b.engine.key.max_batch == 3 and b.engine.key.opt_batch == 3
    assert b.describe().startswith("tensorrt 10.16.1.11 on Quadro RTX 5000 (sm_75), fp16, engine ts_demo_small_fp16-")
    x = stack.cp.asarray(np.ones((3, 1, 32, 128, 192), np.float16))
    out = b(x)
    assert out.shape == (3, 15, 32, 128, 192) and float(out.get()[0, 4].max()) == 9.0  # 1 * 5 + 4
    b.close()
    b.close()  # idempotent


def test_auto_takes_tensorrt_first_on_a_gpu(gpu_stack, packaged_bundle):
    gpu_stack()
    assert create_backend(packaged_bundle, "auto", "auto").name == "tensorrt"


def test_missing_tensorrt_is_one_line_with_the_fix(gpu_stack, packaged_bundle, shared_data, tmp_path, capsys):
    gpu_stack(tensorrt=False)
    with pytest.raises(BackendUnavailableError, match=r"TensorRT is not installed .*pip install 'flare-rt\[tensorrt\]'"):
        create_backend(packaged_bundle, "tensorrt", "cuda")
    rc = main(["segment", str(shared_data / "ts_example_ct_sm.nii.gz"), str(tmp_path / "out.nii.gz"),
               "--backend", "tensorrt", "--device", "cuda", "-q"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if not line.startswith("WARNING")]  # the demo-model notice aside
    assert rc == 4 and len(errors) == 1 and errors[0].startswith("flare-rt: error: TensorRT is not installed")
    assert not (tmp_path / "out.nii.gz").exists()


@pytest.mark.parametrize("devices, message", [("0", "no CUDA GPU found"),
                                              ("-1", "no usable CUDA GPU .*cudaErrorInsufficientDriver")])
def test_no_gpu_is_one_line(gpu_stack, packaged_bundle, monkeypatch, devices, message):
    gpu_stack()
    monkeypatch.setenv("FAKE_CUDA_DEVICES", devices)
    with pytest.raises(BackendUnavailableError, match=message):
        create_backend(packaged_bundle, "tensorrt", "cuda")


def test_cpu_device_and_quantised_bundles_are_refused(gpu_stack, packaged_bundle, tmp_path):
    gpu_stack()
    with pytest.raises(BackendUnavailableError, match="runs on a CUDA GPU, not --device cpu"):
        create_backend(packaged_bundle, "tensorrt", "cpu")
    q = Bundle.load(write_bundle(packaged_bundle.load_onnx(), packaged_bundle.meta.with_(precision="int8"),
                                 tmp_path / "q.onnx"))
    with pytest.raises(BackendUnavailableError, match="'int8' bundle; the tensorrt backend builds fp16 or fp32"):
        create_backend(q, "tensorrt", "cuda")


def _fallback_line(caplog) -> str:
    """The registry's one line on what it used and what was not usable (and why)."""
    (line,) = [r.getMessage() for r in caplog.records if "not usable" in r.getMessage()]
    return line


def test_auto_falls_back_with_a_log_line_when_tensorrt_is_missing(gpu_stack, packaged_bundle, caplog):
    caplog.set_level(logging.INFO)
    gpu_stack(tensorrt=False)  # a GPU but no TensorRT, no CUDA torch, no CUDA onnxruntime
    b = create_backend(packaged_bundle, "auto", "auto")
    assert (b.name, b.device) == (CPU_FIRST, "cpu")
    line = _fallback_line(caplog)
    assert line.startswith(f"backend {b.describe()} (not usable: tensorrt on cuda: TensorRT is not installed")
    assert "pip install 'flare-rt[tensorrt]'" in line


def test_auto_falls_back_when_no_engine_fits_and_building_is_off(gpu_stack, packaged_bundle, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    gpu_stack()
    monkeypatch.setenv("FLARE_RT_ENGINE_BUILD", "never")
    b = create_backend(packaged_bundle, "auto", "auto")
    assert b.name == CPU_FIRST
    assert "(not usable: tensorrt on cuda: no TensorRT engine for fp16" in _fallback_line(caplog)
    monkeypatch.setenv("FLARE_RT_ENGINE_BUILD", "sometimes")
    with pytest.raises(Exception, match=r"FLARE_RT_ENGINE_BUILD='sometimes': must be one of \('auto', 'never', 'force'\)"):
        create_backend(packaged_bundle, "tensorrt", "cuda")


@pytest.mark.parametrize("cached", [False, True], ids=["to-build", "baked"])
def test_auto_falls_back_when_tensorrt_cannot_start_cuda(gpu_stack, packaged_bundle, monkeypatch, caplog, cached):
    """TensorRT that cannot start CUDA (a driver older than its CUDA) returns no builder or runtime, which its
    bindings raise as pybind11's TypeError (test_trt_bindings.py shows the real ones do): one line with
    TensorRT's reason and the fallback, whether the engine was baked or would be built. A baked engine is
    not at fault: it is neither rebuilt nor removed."""
    caplog.set_level(logging.INFO)
    stack = gpu_stack()
    if cached:
        create_backend(packaged_bundle, "tensorrt", "cuda").close()  # an engine in the cache
    engines = sorted(stack.cache.glob("*.engine"))
    caplog.clear()
    monkeypatch.setenv("FAKE_TRT_FAIL", "cuda_init")
    with pytest.raises(BackendUnavailableError) as err:
        create_backend(packaged_bundle, "tensorrt", "cuda")
    what = "runtime" if cached else "builder"
    assert str(err.value).startswith(f"TensorRT could not create its {what} (warning: CUDA initialization failure "
                                     "with error: 35.") and "\n" not in str(err.value)
    b = create_backend(packaged_bundle, "auto", "auto")
    assert b.name == CPU_FIRST
    assert f"(not usable: tensorrt on cuda: TensorRT could not create its {what} (warning: CUDA initialization " \
           "failure" in _fallback_line(caplog)
    assert sorted(stack.cache.glob("*.engine")) == engines and len(stack.trt.BUILDS) == int(cached)
    if cached:
        assert not [r for r in caplog.records if "building" in r.getMessage()]


def test_auto_falls_back_for_a_quantised_bundle(gpu_stack, packaged_bundle, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    gpu_stack()
    checks = tuple(CaseAgreement(FileHash(n, n), {"liver": 1.0}, 1000, 1.0, 1.0, 1) for n in ("a", "b"))
    proven = PrecisionRecord("int8", "test", "onnxruntime", FileHash("fp32.onnx", "f"), checks=checks)  # auto may use it
    q = Bundle.load(write_bundle(packaged_bundle.load_onnx(),
                                 packaged_bundle.meta.with_(precision="int8", precision_record=proven, format_version=2),
                                 tmp_path / "q.onnx"))
    assert create_backend(q, "auto", "auto").name == "onnxruntime"
    assert "tensorrt on cuda: " in _fallback_line(caplog) and "'int8' bundle" in _fallback_line(caplog)


def test_segment_with_tensorrt_builds_the_profile_of_batch_size(gpu_stack, shared_data, tmp_path, capsys,
                                                                monkeypatch):
    stack = gpu_stack()
    # The pipeline on host arrays (the runner uploads each batch): the CuPy double is not a CuPy.
    monkeypatch.setattr(TensorRTBackend, "xp", property(lambda self: np))
    out = tmp_path / "seg.nii.gz"
    rc = main(["segment", str(shared_data / "ts_example_ct_sm.nii.gz"), str(out), "--backend", "tensorrt",
               "--device", "cuda", "--batch-size", "2", "--step", "1", "-q"])
    assert rc == 0, capsys.readouterr().err
    (engine,) = stack.cache.glob("*.engine")
    assert "-fp16-b1-2-2-quadro-rtx-5000-sm75-trt10.16.1.11-" in engine.name
    import SimpleITK as sitk

    seg, ct = sitk.ReadImage(str(out)), sitk.ReadImage(str(shared_data / "ts_example_ct_sm.nii.gz"))
    assert seg.GetSize() == ct.GetSize() and seg.GetPixelID() == sitk.sitkUInt8


def test_image_start_up_reports_what_it_found(gpu_stack, packaged_bundle, monkeypatch, caplog):
    """The challenge image's start-up with an engine baked on another card: build under auto (and say
    why the baked one does not fit), reuse on the next start, fall back under never."""
    caplog.set_level(logging.INFO)
    gpu_stack(gpu="NVIDIA GeForce RTX 4090", cc="8.9")
    baked = create_backend(packaged_bundle, "auto", "auto", batch_size=2).engine.path
    gpu_stack()  # the organisers' card
    first = create_backend(packaged_bundle, "auto", "auto", batch_size=2)
    assert first.name == "tensorrt" and first.engine.source == "built"
    assert f"that do not fit: {baked.name}: GPU NVIDIA GeForce RTX 4090 (sm_89), here Quadro RTX 5000 (sm_75)" \
        in caplog.text
    second = create_backend(packaged_bundle, "auto", "auto", batch_size=2)
    assert second.engine.source == "cache" and f"using cached engine {first.engine.path}" in caplog.text
    first.engine.path.unlink()
    monkeypatch.setenv("FLARE_RT_ENGINE_BUILD", "never")
    fallback = create_backend(packaged_bundle, "auto", "auto", batch_size=2)
    assert fallback.name == CPU_FIRST
    assert f"{baked.name}: GPU NVIDIA GeForce RTX 4090 (sm_89)" in _fallback_line(caplog)


PROBE = """
import sys
import numpy as np
import cupy
from flare_rt.backends import create_backend
from flare_rt.backends.tensorrt import TensorRTBackend
from flare_rt.bundle import Bundle
from flare_rt.resources import packaged_model
b = create_backend(Bundle.load(packaged_model()), "auto", "cuda", batch_size=2)
out = b(cupy.asarray(np.zeros((2, 1, 32, 128, 192), np.float16)))
print(b.name, out.shape, sorted(m for m in ("torch", "tensorrt", "cupy") if m in sys.modules))
"""


def test_the_production_path_imports_no_torch(tmp_path):
    """A fresh interpreter (the doubles on PYTHONPATH, as in the image) builds and runs the engine
    without importing torch."""
    env = {**os.environ, "PYTHONPATH": f"{FAKES}{os.pathsep}{REPO}", "FLARE_RT_CACHE": str(tmp_path),
           "FAKE_GPU_NAME": "Quadro RTX 5000", "FAKE_GPU_CC": "7.5"}
    env.pop("FLARE_RT_ENGINE_BUILD", None)
    r = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "tensorrt (2, 15, 32, 128, 192) ['cupy', 'tensorrt']"
