"""GPU timing of the native kernels against the CuPy library paths they replace, on the sizes of a
512x512x~270 CT (0.78x0.78x1.25 mm) and the packaged bundle's network (classes, patch, spacing).

    python bench/kernels.py                         # prints one table; needs CuPy and a CUDA device
    python bench/kernels.py --json bench/results/kernels.json --repeat 20

Rows (each checked for equal results before it is timed):
- labels: blended logits -> uint8 labels on the CT grid for the whole volume, block by block as the
  window emits them. library = postprocess.labels_refined on CuPy (refine_plane per output slice);
  kernel = labels_from_logits per block.
- labels+normalise: the same from the raw blend buffer and weight sum. library = the window's emit
  normalisation (where / maximum / astype) then labels_refined; kernel = labels_from_logits(weights=).
- accumulate fp32/fp16: Gaussian-weighted scatter of one row of tiles in batches. library = the
  window's per-tile loop (p *= gauss; acc += p; wsum += gauss); kernel = accumulate_tiles per batch.
Times are device times between CUDA events (cupyx.profiler.benchmark: median and min over
--repeat runs after warm-up); "pool MiB" is how much CuPy's memory pool grew during one run
(temporaries), measured from an emptied pool. The kernel module's cold load is timed apart.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from flare_rt.atomic import atomic_path  # noqa: E402
from flare_rt.bundle import Bundle  # noqa: E402
from flare_rt.kernels import accumulate_tiles, labels_from_logits, load_kernels  # noqa: E402
from flare_rt.postprocess import labels_refined  # noqa: E402
from flare_rt.preprocess import compute_new_shape  # noqa: E402
from flare_rt.resample import ResamplePlan, z_source_index  # noqa: E402
from flare_rt.resources import packaged_model  # noqa: E402
from flare_rt.window import compute_steps, gaussian_map  # noqa: E402

log = logging.getLogger("bench.kernels")


def smooth_logits(cp, k: int, shape, seed: int):
    """Logits with organ-sized regions (smoothed noise), so the share of label boundaries, which
    sets refine_plane's work, is realistic (reported as 'boundary %')."""
    from cupyx.scipy.ndimage import gaussian_filter

    rs = cp.random.RandomState(seed)
    out = cp.empty((k, *shape), cp.float32)
    for c in range(k):
        out[c] = gaussian_filter(rs.standard_normal(shape, dtype=cp.float32), (1.5, 6, 6)) * 40
    return out


def timed(cp, fn, repeat: int) -> dict:
    from cupyx.profiler import benchmark

    pool = cp.get_default_memory_pool()
    cp.cuda.Device().synchronize()
    pool.free_all_blocks()
    before = pool.total_bytes()
    fn()
    cp.cuda.Device().synchronize()
    grown = (pool.total_bytes() - before) / 2**20
    r = benchmark(fn, n_repeat=repeat, n_warmup=2)
    gpu = r.gpu_times[0] * 1e3
    return {"median_ms": float(np.median(gpu)), "min_ms": float(gpu.min()), "pool_mib": grown}


def bench_labels(cp, k, net_shape, out_shape, rows, repeat):
    plan = ResamplePlan(net_shape, out_shape, 0, 1, 0)
    idx = z_source_index(net_shape[0], out_shape[0])
    logits = smooth_logits(cp, k, net_shape, 0)
    w = cp.asarray(np.random.default_rng(1).uniform(1, 30, net_shape).astype(np.float32))
    acc = logits * w  # the blend buffer before normalisation
    blocks = [(z0, min(z0 + rows, net_shape[0])) for z0 in range(0, net_shape[0], rows)]

    def library():
        return labels_refined(((z0, z1, logits[:, z0:z1]) for z0, z1 in blocks), plan)

    def kernel(weighted: bool):
        labels = cp.empty(out_shape, cp.uint8)
        for z0, z1 in blocks:
            t = np.flatnonzero((idx >= z0) & (idx < z1))
            if t.size:
                src = (acc if weighted else logits)[:, z0:z1]
                labels_from_logits(src, idx[t] - z0, out_shape[1:], weights=w[z0:z1] if weighted else None,
                                   out=labels[t[0]:t[-1] + 1])
        return labels

    def library_normalise():
        def emit():
            for z0, z1 in blocks:
                blk, ww = acc[:, z0:z1], w[z0:z1]
                yield z0, z1, cp.where(ww > 0, blk / cp.maximum(ww, 1e-30), 0).astype(cp.float32)
        return labels_refined(emit(), plan)

    want = library()
    boundary = 100 * float(library_boundary_share(cp, logits, plan))
    assert bool((kernel(False) == want).all()), "labels_from_logits differs from labels_refined"
    assert bool((kernel(True) == library_normalise()).all()), "fused normalisation differs"
    rows_out = [("labels", "library", "fp32", timed(cp, library, repeat)),
                ("labels", "kernel", "fp32", timed(cp, lambda: kernel(False), repeat)),
                ("labels+normalise", "library", "fp32", timed(cp, library_normalise, repeat)),
                ("labels+normalise", "kernel", "fp32", timed(cp, lambda: kernel(True), repeat))]
    return rows_out, boundary


def library_boundary_share(cp, logits, plan):
    """Share of output voxels whose four network neighbours disagree (where refine_plane interpolates)."""
    from flare_rt.resample import linear_weights

    net = logits.argmax(0)
    (y0, y1, _), (x0, x1, _) = (linear_weights(n, m) for n, m in zip(plan.in_shape[1:], plan.out_shape[1:]))
    y0, y1, x0, x1 = (cp.asarray(a) for a in (y0, y1, x0, x1))
    a = net[:, y0][:, :, x0]
    diff = (a != net[:, y0][:, :, x1]) | (a != net[:, y1][:, :, x0]) | (a != net[:, y1][:, :, x1])
    return diff.mean()


def bench_accumulate(cp, k, plane, patch, batch, repeat):
    buffer = (patch[0], *(max(s, p) for s, p in zip(plane, patch[1:])))
    steps = compute_steps(buffer, patch, 0.5)
    origins = np.array([(0, y, x) for y in steps[1] for x in steps[2]])
    gauss = cp.asarray(gaussian_map(patch))
    op = f"accumulate ({len(origins)} tiles, batch {batch})"
    return [row for dtype in (cp.float32, cp.float16)
            for row in bench_accumulate_dtype(cp, k, buffer, patch, origins, gauss, batch, repeat, dtype, op)]


def bench_accumulate_dtype(cp, k, buffer, patch, origins, gauss, batch, repeat, dtype, op):
    rs = cp.random.RandomState(2)
    preds = (rs.standard_normal((len(origins), k, *patch), dtype=cp.float32) * 5).astype(dtype)
    acc = cp.zeros((k, *buffer), cp.float32)
    wsum = cp.zeros(buffer, cp.float32)
    pz, py, px = patch

    def library():
        acc.fill(0)
        wsum.fill(0)
        for s in range(0, len(origins), batch):
            pred = preds[s:s + batch].copy()  # the network's fresh output (the loop scales it in place)
            for p, (z, y, x) in zip(pred, origins[s:s + batch]):
                p *= gauss
                acc[:, z:z + pz, y:y + py, x:x + px] += p
                wsum[z:z + pz, y:y + py, x:x + px] += gauss

    def kernel():
        acc.fill(0)
        wsum.fill(0)
        for s in range(0, len(origins), batch):
            accumulate_tiles(acc, wsum, preds[s:s + batch], gauss, origins[s:s + batch])

    kernel()
    got = acc.copy(), wsum.copy()
    library()
    if dtype == cp.float32:
        assert bool((got[0] == acc).all() and (got[1] == wsum).all()), "accumulate_tiles differs"
    name = "fp32" if dtype == cp.float32 else "fp16"
    return [(op, "library", name, timed(cp, library, repeat)), (op, "kernel", name, timed(cp, kernel, repeat))]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ct-shape", type=int, nargs=3, default=(270, 512, 512), metavar=("Z", "Y", "X"))
    ap.add_argument("--ct-spacing", type=float, nargs=3, default=(1.25, 0.78125, 0.78125))
    ap.add_argument("--rows", type=int, default=None, help="network rows per emitted block (default: patch z / 2)")
    ap.add_argument("--batch", type=int, default=4, help="tiles per network batch")
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import cupy as cp

    meta = Bundle.load(packaged_model()).meta
    k, patch = meta.num_classes, tuple(meta.patch_size)
    net_shape = tuple(compute_new_shape(args.ct_shape, args.ct_spacing, meta.spacing))
    t0 = time.perf_counter()
    module = load_kernels(cp)
    cold = time.perf_counter() - t0
    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    head = {"device": props["name"].decode(), "cupy": cp.__version__, "kernels": module.describe(),
            "cold_load_s": cold, "classes": k, "patch": patch, "ct_shape": tuple(args.ct_shape),
            "net_shape": net_shape}
    rows = args.rows or max(1, patch[0] // 2)
    label_rows, boundary = bench_labels(cp, k, net_shape, tuple(args.ct_shape), rows, args.repeat)
    head["boundary_percent"] = boundary
    table = label_rows + bench_accumulate(cp, k, net_shape[1:], patch, args.batch, args.repeat)

    print(f"device: {head['device']}, CuPy {head['cupy']}; {head['kernels']} (cold load {cold:.2f} s)")
    print(f"CT {head['ct_shape']} -> network {net_shape}, {k} classes, patch {patch}; "
          f"label boundaries: {boundary:.1f}% of output voxels")
    print(f"{'operation':<36} {'path':<8} {'dtype':<5} {'median ms':>10} {'min ms':>9} {'pool MiB':>9} {'speed-up':>9}")
    lib = {}
    out_rows = []
    for op, path, dtype, r in table:
        key = (op, dtype)
        if path == "library":
            lib[key] = r["median_ms"]
        gain = f"{lib[key] / r['median_ms']:.1f}x" if path == "kernel" and key in lib else ""
        print(f"{op:<36} {path:<8} {dtype:<5} {r['median_ms']:>10.2f} {r['min_ms']:>9.2f} {r['pool_mib']:>9.1f} "
              f"{gain:>9}")
        out_rows.append({"operation": op, "path": path, "dtype": dtype, **r})
    if args.json:
        with atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps({**head, "rows": out_rows}, indent=1, default=list))
    return 0


if __name__ == "__main__":
    sys.exit(main())
