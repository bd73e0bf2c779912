"""``flare-rt build-engine`` against the TensorRT double: builds ahead of time, prints key and path,
reuses an existing engine unless --force, refuses another GPU, and the runtime then uses that engine."""
from __future__ import annotations

import pytest
from cli_errors import error_line

from flare_rt.backends import create_backend
from flare_rt.cli import main


def run(capsys, *argv):
    rc = main(["build-engine", *argv, "-q"])
    out, err = capsys.readouterr()
    return rc, dict(line.split(None, 1) for line in out.splitlines()), err


def test_build_ahead_of_time_then_reuse(gpu_stack, packaged_bundle, capsys):
    stack = gpu_stack()
    rc, out, _ = run(capsys, str(packaged_bundle.path), "--batch-size", "4", "--workspace", "256")
    assert rc == 0
    engine = stack.cache / out["engine"].split("/")[-1]
    assert out["engine"] == str(engine) and engine.is_file()
    assert out["status"].startswith("built in ")
    assert out["key"].startswith("fp16, batch 1/4/4, Quadro RTX 5000 (sm_75), TensorRT 10.16.1.11, ")
    assert out["config"] == "precision=fp16, min_batch=1, opt_batch=4, max_batch=4, workspace_mb=256, timing_cache=None"
    assert out["timing"] == str(stack.cache / "timing-quadro-rtx-5000-sm75-trt10.16.1.11.cache")
    assert ("set_memory_pool_limit", stack.trt.MemoryPoolType.WORKSPACE, 256 << 20) in stack.trt.CALLS

    rc, again, _ = run(capsys, str(packaged_bundle.path), "--batch-size", "4")
    assert rc == 0 and again["engine"] == out["engine"] and again["status"].startswith("cached")
    assert len(stack.trt.BUILDS) == 1
    b = create_backend(packaged_bundle, "tensorrt", "cuda", batch_size=4)  # segment finds the baked engine
    assert b.engine.source == "cache" and str(b.engine.path) == out["engine"]

    rc, forced, _ = run(capsys, "--batch-size", "4", "--force")  # default bundle: the packaged model
    assert rc == 0 and forced["status"].startswith("built") and len(stack.trt.BUILDS) == 2
    assert forced["engine"] == out["engine"]


def test_a_named_timing_cache_is_written_and_read_back(gpu_stack, capsys, tmp_path):
    stack = gpu_stack()
    timing = tmp_path / "tc" / "rtx5000.cache"
    rc, out, _ = run(capsys, "--timing-cache", str(timing))
    assert rc == 0 and out["timing"] == str(timing) and timing.is_file()
    first = timing.read_bytes()
    rc, _, _ = run(capsys, "--timing-cache", str(timing), "--force")  # the second build starts from it
    assert rc == 0
    assert [c[1] for c in stack.trt.CALLS if c[0] == "create_timing_cache"] == [b"", first]
    assert timing.read_bytes() != first  # and saves what it added


def test_fp32_engine_from_the_fp16_bundle(gpu_stack, capsys):
    stack = gpu_stack()
    rc, out, _ = run(capsys, "--precision", "fp32")
    assert rc == 0 and out["key"].startswith("fp32, batch 1/1/1")
    assert stack.trt.BUILDS[-1]["input"][2] == "FLOAT"


@pytest.mark.parametrize("argv, code, message", [
    (["--gpu", "RTX 5000"], 0, None),
    (["--gpu", "A100"], 4, "this machine's GPU is Quadro RTX 5000 (sm_75), not 'A100'"),
    (["--batch-size", "0"], 6, "batch size must be >= 1, got 0"),
])
def test_arguments(gpu_stack, capsys, argv, code, message):
    gpu_stack()
    rc, _, err = run(capsys, *argv)
    assert rc == code
    if message:
        (line,) = [x for x in err.splitlines() if x.startswith("flare-rt: error:")]
        assert message in line


def test_without_tensorrt(gpu_stack, capsys):
    gpu_stack(tensorrt=False)
    rc, _, err = run(capsys)
    assert rc == 4 and "flare-rt: error: TensorRT is not installed" in err


def test_a_tensorrt_that_cannot_start_is_one_line(gpu_stack, capsys, monkeypatch):
    """Baking on a machine whose TensorRT cannot start CUDA: exit 4, one error line with TensorRT's reason,
    no traceback, no engine file."""
    stack = gpu_stack()
    monkeypatch.setenv("FAKE_TRT_FAIL", "cuda_init")
    rc, out, err = run(capsys)
    assert rc == 4 and out == {}
    assert error_line(err).startswith("flare-rt: error: TensorRT could not create its builder (warning: CUDA "
                                      "initialization failure with error: 35.")
    assert not list(stack.cache.glob("*.engine"))
