"""The pipeline's use of the native kernels, on the CPU: ``window.sliding_window_blocks`` (tile origins
relative to the rolling blend buffer) and ``postprocess._labels_native`` (block rows to output slices) run
as on a GPU, with the two kernels replaced by numpy references of their documented contracts. Labels must
equal the library path's on a real CT, so a slip in that glue fails here rather than on a GPU; the kernels
themselves are compared with the library on a GPU (test_kernels_gpu.py). Also: when the pipeline uses
them (CuPy, not switched off, the module loads)."""
from __future__ import annotations

import logging
import types
from dataclasses import replace

import numpy as np
import pytest

import flare_rt.kernels as kernels
from flare_rt import postprocess, window
from flare_rt.backends import create_backend
from flare_rt.bundle import Bundle
from flare_rt.io import load_volume
from flare_rt.kernels import KernelUnavailableError, native_enabled
from flare_rt.pipeline import DEVICE_BLOCK_ROWS, SegmentOptions, Segmenter
from flare_rt.postprocess import refine_plane
from flare_rt.resources import packaged_model


def reference_accumulate(acc, wsum, pred, gauss, origins):
    """accumulate_tiles' contract: tile after tile, acc[:, tile] += pred[b] * gauss, wsum[tile] += gauss."""
    pz, py, px = gauss.shape
    for p, (z, y, x) in zip(np.asarray(pred, dtype=np.float32), origins):
        acc[:, z:z + pz, y:y + py, x:x + px] += p * gauss
        wsum[z:z + pz, y:y + py, x:x + px] += gauss


def reference_labels(logits, src, out_plane, *, weights=None, empty_background=False, out=None):
    """labels_from_logits' contract without weights: out[i] = refine_plane(logits[:, src[i]], out_plane)."""
    assert weights is None and not empty_background
    labels = np.stack([refine_plane(logits[:, s], tuple(out_plane)) for s in src])
    if out is None:
        return labels
    out[...] = labels
    return out


def test_pipeline_glue_of_the_kernels_gives_the_library_labels(example_ct_path, tmp_path, monkeypatch):
    import nibabel

    bundle = Bundle.load(packaged_model())
    # 66 slices of the example CT's abdomen (2 tile rows: the blend buffer shifts), in-plane 61 x 60 voxels
    # (2 x 1 tiles); 4 tiles a run keep the ONNX Runtime time small
    path = tmp_path / "part.nii.gz"
    nibabel.save(nibabel.load(str(example_ct_path)).slicer[30:91, 20:80, 40:106], str(path))
    vol = load_volume(path)
    calls = {"accumulate": 0, "labels": 0}

    def counted(name, fn):
        def call(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return call

    with create_backend(bundle, "onnxruntime", "cpu") as backend:
        seg = Segmenter(bundle, backend, SegmentOptions(mode="fast", batch_size=2))  # tile order within a batch
        seg.window = replace(seg.window, block_rows=DEVICE_BLOCK_ROWS)  # the blocks a GPU run makes
        library = seg.predict(vol)
        monkeypatch.setattr(window, "native_enabled", lambda xp: True)
        monkeypatch.setattr(postprocess, "native_enabled", lambda xp: True)
        monkeypatch.setattr(kernels, "accumulate_tiles", counted("accumulate", reference_accumulate))
        monkeypatch.setattr(kernels, "labels_from_logits", counted("labels", reference_labels))
        native = seg.predict(vol)
    assert 2 <= calls["accumulate"] < native.tiles and calls["labels"] > 1, (calls, native.tiles)
    assert len(np.unique(library.labels)) > 3
    np.testing.assert_array_equal(native.labels, library.labels)


def fake_cupy(device: int = 0):
    return types.SimpleNamespace(__name__="cupy", cuda=types.SimpleNamespace(
        Device=lambda: types.SimpleNamespace(id=device)))


def test_kernels_are_used_on_cupy_unless_switched_off_or_not_loadable(monkeypatch, caplog):
    monkeypatch.setattr(kernels, "_usable", {})
    loads = []
    monkeypatch.setattr(kernels, "load_kernels", lambda cp: loads.append(cp))
    monkeypatch.delenv(kernels.NATIVE_ENV, raising=False)
    assert not native_enabled(np)
    cp = fake_cupy()
    assert native_enabled(cp) and native_enabled(cp) and len(loads) == 1  # loaded once per device
    monkeypatch.setenv(kernels.NATIVE_ENV, "0")
    assert not native_enabled(cp)
    monkeypatch.setenv(kernels.NATIVE_ENV, "1")

    def unavailable(cp):
        raise KernelUnavailableError("no code for sm_75 in the fatbin and NVRTC failed")

    monkeypatch.setattr(kernels, "load_kernels", unavailable)
    with caplog.at_level(logging.WARNING, logger="flare_rt.kernels"):
        assert not native_enabled(fake_cupy(1)) and not native_enabled(fake_cupy(1))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "sm_75" in warnings[0] and "library path" in warnings[0]
