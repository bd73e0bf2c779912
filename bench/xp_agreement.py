"""How far the GPU preprocessing is from the CPU one: the same flare-rt functions called with numpy arrays
and with CuPy arrays (``flare_rt.preprocess.ct_normalize``, ``flare_rt.resample.resample``; they pick
their array module through ``flare_rt.xp``), on a real CT, with the bundle's normalisation and spacing.

    python bench/xp_agreement.py IMAGE.nii.gz --bundle BUNDLE.onnx --out XP.json

Writes max and mean |Δ| per step (normalised image; resampled image with float32 and with float64
interpolation, i.e. fast and faithful mode's setting), and the CPU-faithful vs GPU-fast difference
for context. Without CuPy or a GPU it writes ``{"error": ...}`` and exits 2, so a report can say why.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import types
from pathlib import Path

import numpy as np

from benchpath import BENCH, REPO  # noqa: E402,F401  (sys.path: this checkout)

from flare_rt.atomic import atomic_path  # noqa: E402
from flare_rt.bundle import BundleMeta  # noqa: E402
from flare_rt.pipeline import compact_ct  # noqa: E402
from flare_rt.preprocess import compute_new_shape, ct_normalize, nonzero_crop  # noqa: E402
from flare_rt.resample import make_plan, resample  # noqa: E402
from flare_rt.xp import to_numpy  # noqa: E402


def _diff(a, b) -> dict:
    a, b = to_numpy(a).astype(np.float64), to_numpy(b).astype(np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    d = np.abs(a - b)
    return {"max_abs": float(d.max()), "mean_abs": float(d.mean()), "range": [float(a.min()), float(a.max())],
            "shape": list(a.shape)}


def _timed(fn, xp: types.ModuleType):
    t0 = time.perf_counter()
    out = fn()
    if xp is not np:
        xp.cuda.get_current_stream().synchronize()
    return out, time.perf_counter() - t0


def compare(image: np.ndarray, spacing, meta: BundleMeta, xp: types.ModuleType) -> dict:
    """Run crop → CT normalisation → resampling (float32 and float64 interpolation) on numpy and on
    ``xp`` arrays, with the calls ``Segmenter.predict`` makes (the CT compacted to int16, the
    normalisation applied by ``resample`` slice by slice); the differences and timings (``xp``
    timings include its first-call compilation)."""
    arr = compact_ct(image.transpose(meta.transpose_forward))
    spacing = tuple(spacing[i] for i in meta.transpose_forward)
    crop = nonzero_crop(arr)
    cropped = np.ascontiguousarray(arr[crop.slices])
    net_shape = compute_new_shape(crop.shape_after, spacing, meta.spacing)
    plan = make_plan(crop.shape_after, net_shape, spacing, meta.spacing, meta.resampling, probabilities=False)
    out: dict = {"network_shape": list(net_shape), "cropped_shape": list(crop.shape_after), "timings_s": {},
                 "comparisons": {}}
    results = {}
    for mod in (np, xp):
        tag = "numpy" if mod is np else mod.__name__
        src = cropped if mod is np else mod.asarray(cropped)
        pre = lambda a: ct_normalize(a, meta.normalization)  # noqa: E731
        norm, t_norm = _timed(lambda: pre(src), mod)
        r32, t32 = _timed(lambda: resample(src[None], plan, np.float32, compute_dtype=np.float32, pre=pre), mod)
        r64, t64 = _timed(lambda: resample(src[None], plan, np.float32, compute_dtype=np.float64, pre=pre), mod)
        results[tag] = (norm, r32, r64)
        out["timings_s"][tag] = {"normalise": t_norm, "resample_float32": t32, "resample_float64": t64}
    (n_np, r32_np, r64_np), (n_xp, r32_xp, r64_xp) = results["numpy"], results[list(results)[-1]]
    c = out["comparisons"]
    c["normalised (float32)"] = _diff(n_np, n_xp)
    c["resampled, float32 interpolation (fast mode)"] = _diff(r32_np, r32_xp)
    c["resampled, float64 interpolation (faithful mode)"] = _diff(r64_np, r64_xp)
    c["context: CPU float64 vs GPU float32 interpolation"] = _diff(r64_np, r32_xp)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="CuPy vs numpy bounds of flare-rt's preprocessing on a real CT")
    p.add_argument("image", type=Path)
    p.add_argument("--bundle", type=Path, required=True, help="bundle whose normalisation and spacing to use")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--case", default=None, help="case name for the report (default: the file name)")
    args = p.parse_args(argv)
    from flare_rt.bundle import read_meta
    from measure import read_zyx

    result: dict = {"case": args.case or args.image.name, "image": str(args.image), "bundle": str(args.bundle)}
    code = 0
    try:
        import cupy

        cupy.zeros(1).sum()  # fails here, not mid-comparison, without a usable GPU
        image, spacing = read_zyx(args.image)
        result.update(compare(image, spacing, read_meta(args.bundle), cupy), cupy=cupy.__version__,
                      device=cupy.cuda.runtime.getDeviceProperties(0)["name"].decode())
    except ImportError as exc:
        result["error"], code = f"CuPy is not installed ({exc})", 2
    except Exception as exc:  # CUDA errors are not one class (cupy.cuda.runtime.CUDARuntimeError, driver errors)
        result["error"], code = f"{type(exc).__name__}: {exc}", 2
    with atomic_path(args.out) as tmp:
        tmp.write_text(json.dumps(result, indent=1))
    sys.stdout.write(json.dumps({k: v for k, v in result.items() if k != "timings_s"}, indent=1) + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
