"""Test doubles of TensorRT and CuPy (``fakes/``), installed per test under their real module names."""
from __future__ import annotations

import logging
import os
import sys
from types import SimpleNamespace

import pytest
from trt_doubles import TRT10, load_fake


@pytest.fixture
def gpu_stack(monkeypatch, tmp_path):
    """``install(trt_version=..., gpu=..., cc=...)`` puts a fresh fake tensorrt and cupy in sys.modules
    (for this test only) and returns them; the engine cache is a fresh folder."""
    monkeypatch.setenv("FLARE_RT_CACHE", str(tmp_path / "cache"))
    import flare_rt.devices

    # --device auto asks the driver (libcuda) for a GPU: the double's count instead
    monkeypatch.setattr(flare_rt.devices, "cuda_device_count",
                        lambda: max(0, int(os.environ.get("FAKE_CUDA_DEVICES", "1"))))
    for var in ("FLARE_RT_ENGINE_BUILD", "FAKE_TRT_FAIL", "FAKE_CUDA_DEVICES"):
        monkeypatch.delenv(var, raising=False)

    def install(trt_version: str = TRT10, gpu: str = "Quadro RTX 5000", cc: str = "7.5", tensorrt: bool = True):
        monkeypatch.setenv("FAKE_TRT_VERSION", trt_version)
        monkeypatch.setenv("FAKE_GPU_NAME", gpu)
        monkeypatch.setenv("FAKE_GPU_CC", cc)
        cp = load_fake("cupy", monkeypatch)
        if tensorrt:
            trt = load_fake("tensorrt", monkeypatch)
        else:
            monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
            trt = None
        return SimpleNamespace(trt=trt, cp=cp, cache=tmp_path / "cache" / "engines")

    return install


@pytest.fixture
def packaged_bundle():
    from flare_rt.bundle import Bundle
    from flare_rt.resources import packaged_model

    return Bundle.load(packaged_model())


@pytest.fixture
def log_text(caplog):
    """All log messages so far, as one string (INFO and up)."""
    caplog.set_level(logging.INFO)
    return lambda: "\n".join(r.getMessage() for r in caplog.records)
