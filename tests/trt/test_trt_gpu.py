"""The real TensorRT on a real GPU (skipped with a reason where either is missing; CPU machines run
the same logic against the doubles in the other test_trt_* files): build an engine from the packaged
fp16 bundle, check its logits against ONNX Runtime, reuse it from the cache, and compare its labels
on a real CT with the torch path on the same GPU (per-class Dice >= 0.98)."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from flare_rt.evaluate.metrics import dice

pytestmark = [pytest.mark.gpu, pytest.mark.tensorrt]
MIN_DICE, MIN_VOXELS = 0.98, 1000


@pytest.fixture(scope="module")
def real_gpu():
    for module in ("tensorrt", "cupy"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed (TensorRT GPU test)")
    import cupy

    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            pytest.skip("no CUDA GPU")
    except (cupy.cuda.runtime.CUDARuntimeError, RuntimeError, OSError) as exc:  # no driver, no CUDA libraries
        pytest.skip(f"no usable CUDA GPU ({exc})")
    return cupy


@pytest.fixture
def cache(tmp_path_factory, monkeypatch):
    path = tmp_path_factory.getbasetemp() / "trt-gpu-cache"  # one build for the module's tests
    monkeypatch.setenv("FLARE_RT_CACHE", str(path))
    monkeypatch.delenv("FLARE_RT_ENGINE_BUILD", raising=False)
    return path


def test_engine_logits_match_onnxruntime_and_the_cache_is_reused(real_gpu, cache, packaged_bundle):
    import onnxruntime as ort

    from flare_rt.backends import create_backend
    from flare_rt.onnx_graph import to_fp32

    cp = real_gpu
    first = create_backend(packaged_bundle, "tensorrt", "cuda", batch_size=2)
    x = np.random.default_rng(0).standard_normal((2, 1, *packaged_bundle.meta.patch_size)).astype(np.float32)
    with cp.cuda.Stream(non_blocking=True):
        out = first(cp.asarray(x, dtype=first.input_dtype)).astype(cp.float32).get()
    sess = ort.InferenceSession(to_fp32(packaged_bundle.load_onnx()).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    ref = sess.run(None, {"image": x.astype(np.float16).astype(np.float32)})[0]
    rel = float(np.abs(out - ref).max() / np.abs(ref).max())
    agree = float((out.argmax(1) == ref.argmax(1)).mean())
    assert rel < 0.05 and agree > 0.99, (rel, agree)
    first.close()
    again = create_backend(packaged_bundle, "tensorrt", "cuda", batch_size=2)
    assert again.engine.source == "cache" and again.engine.path == first.engine.path


def test_labels_agree_with_the_torch_path(real_gpu, cache, packaged_bundle, shared_data):
    from flare_rt.backends import create_backend
    from flare_rt.io import load_volume
    from flare_rt.pipeline import Segmenter, SegmentOptions

    vol = load_volume(shared_data / "ts_example_ct.nii.gz")
    labels = {}
    for name in ("tensorrt", "torch"):
        backend = create_backend(packaged_bundle, name, "cuda", batch_size=2)
        labels[name] = Segmenter(packaged_bundle, backend, SegmentOptions(batch_size=2)).predict(vol).labels
        backend.close()
    a, b = labels["tensorrt"], labels["torch"]
    scores = {c: dice(a == c, b == c) for c in range(1, 15)
              if max((a == c).sum(), (b == c).sum()) >= MIN_VOXELS}
    assert scores and min(scores.values()) >= MIN_DICE, scores
