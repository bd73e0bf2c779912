"""The runner against the TensorRT and CuPy doubles: tensor addresses are the device buffers' pointers,
execution is enqueued on the current stream, shapes are set once per change, the output buffer is
allocated once per batch shape and reused, oversized batches run in profile-sized slices."""
from __future__ import annotations

import numpy as np
import pytest

from flare_rt.errors import ConfigError, EngineError
from flare_rt.trt.build import EngineConfig, build_engine
from flare_rt.trt.runner import EngineRunner
from flare_rt.trt.runtime import make_logger

ITEM = (1, 32, 128, 192)
K = 15


@pytest.fixture
def engine(gpu_stack, packaged_bundle):
    """(stack, runner) for the packaged fp16 bundle, profile 1/2/2."""
    stack = gpu_stack()
    trt = stack.trt
    plan, _ = build_engine(packaged_bundle.load_onnx().SerializeToString(), "image", EngineConfig.for_batch(2), trt,
                           make_logger(trt))
    return stack, EngineRunner(plan, trt, stack.cp, make_logger(trt))


def expected(x: np.ndarray) -> np.ndarray:
    """What the TensorRT double computes: out[b, k] = in[b, 0] * (k + 1) + k, in fp16."""
    k = np.arange(K, dtype=np.float32).reshape(1, K, 1, 1, 1)
    return (x[:, :1].astype(np.float32) * (k + 1) + k).astype(np.float16)


def batch(n, dtype=np.float16, seed=0):
    return np.random.default_rng(seed).standard_normal((n, *ITEM)).astype(dtype)


def calls(trt, name):
    return [c[1:] for c in trt.CALLS if c[0] == name]


def test_runs_on_device_buffers_on_the_current_stream(engine):
    stack, runner = engine
    cp, trt = stack.cp, stack.trt
    assert runner.input_dtype == np.float16 and runner.output_dtype == np.float16
    assert (runner.min_batch, runner.max_batch, runner.item_shape) == (1, 2, ITEM)
    host = batch(2)
    x = cp.asarray(host)
    with cp.cuda.Stream() as stream:
        out = runner(x)
    assert isinstance(out, cp.ndarray) and out.shape == (2, K, 32, 128, 192) and out.dtype == np.float16
    assert calls(trt, "set_input_shape") == [("image", (2, *ITEM))]
    assert calls(trt, "set_tensor_address") == [("image", x.data.ptr), ("logits", out.data.ptr)]
    assert calls(trt, "execute_async_v3") == [(stream.ptr,)] and stream.ptr != 0
    np.testing.assert_array_equal(out.get(), expected(host))


def test_the_output_buffer_is_allocated_once_per_shape_and_reused(engine):
    stack, runner = engine
    cp, trt = stack.cp, stack.trt
    a, b, c = (cp.asarray(batch(n, seed=n + 10)) for n in (2, 2, 1))
    out_a = runner(a)
    ptr = out_a.data.ptr
    out_b = runner(b)
    assert out_b is out_a and out_b.data.ptr == ptr  # same buffer, overwritten by the second call
    np.testing.assert_array_equal(out_b.get(), expected(b.get()))
    out_c = runner(c)  # the tail batch: its own buffer
    assert out_c.shape[0] == 1 and out_c.data.ptr != ptr
    np.testing.assert_array_equal(out_c.get(), expected(c.get()))
    assert runner(a) is out_a
    # the input shape is set only when it changes: 2, 1, 2
    assert [s[1][0] for s in calls(trt, "set_input_shape")] == [2, 1, 2]
    assert calls(trt, "execute_async_v3") == [(0,)] * 4  # the null stream when no other is current


def test_a_batch_beyond_the_profile_runs_in_slices_into_one_buffer(engine):
    stack, runner = engine
    cp, trt = stack.cp, stack.trt
    host = batch(5, seed=3)
    x = cp.asarray(host)
    out = runner(x)
    np.testing.assert_array_equal(out.get(), expected(host))
    item_in = int(np.prod(ITEM)) * 2
    item_out = K * int(np.prod(ITEM[1:])) * 2
    addresses = calls(trt, "set_tensor_address")
    assert addresses[0::2] == [("image", x.data.ptr + i * item_in) for i in (0, 2, 4)]
    assert addresses[1::2] == [("logits", out.data.ptr + i * item_out) for i in (0, 2, 4)]
    assert [s[1][0] for s in calls(trt, "set_input_shape")] == [2, 1]


def test_other_dtypes_and_layouts_are_converted_once(engine):
    stack, runner = engine
    cp = stack.cp
    host = batch(2, np.float32, seed=5)
    out = runner(cp.asarray(host))  # fp32 into the fp16 engine
    np.testing.assert_array_equal(out.get(), expected(host.astype(np.float16)))
    strided = cp.asarray(np.ascontiguousarray(batch(2, seed=6).transpose(0, 1, 2, 4, 3)).transpose(0, 1, 2, 4, 3))
    assert not strided.flags.c_contiguous
    np.testing.assert_array_equal(runner(strided).get(), expected(strided.get()))


def test_host_batches_work_with_a_warning(engine, caplog):
    _, runner = engine
    host = batch(1, seed=7)
    out = runner(host)
    assert isinstance(out, np.ndarray)
    np.testing.assert_array_equal(out, expected(host))
    runner(host)
    assert caplog.text.count("copied to the GPU and back") == 1


def test_wrong_shapes_are_refused(engine):
    stack, runner = engine
    with pytest.raises(ConfigError, match=r"batch of shape \(2, 1, 32, 128, 128\) does not fit the engine's "
                                          r"\(B >= 1, 1, 32, 128, 192\)"):
        runner(stack.cp.asarray(np.zeros((2, 1, 32, 128, 128), np.float16)))
    with pytest.raises(ConfigError, match="does not fit"):
        runner(stack.cp.asarray(np.zeros((0, *ITEM), np.float16)))


def test_deserialisation_and_context_failures_are_engine_errors(gpu_stack, packaged_bundle, monkeypatch):
    stack = gpu_stack()
    trt = stack.trt
    with pytest.raises(EngineError, match="cannot load this engine .*magicTag"):
        EngineRunner(b"not a plan", trt, stack.cp, make_logger(trt), "x.engine")
    plan, _ = build_engine(packaged_bundle.load_onnx().SerializeToString(), "image", EngineConfig(), trt,
                           make_logger(trt))
    monkeypatch.setenv("FAKE_TRT_FAIL", "context")
    with pytest.raises(EngineError, match=r"execution context \(Error Code 2: OutOfMemory.*\); is the GPU out of memory"):
        EngineRunner(plan, trt, stack.cp, make_logger(trt), "x.engine")
