"""Speed of the FLARE DSC/NSD: bounding-box method vs whole-volume reference, same run, same case.

Synthesises a full-size label pair (default 512 x 512 x 300 at 0.8 x 0.8 x 1.0 mm) with all 14
FLARE classes as ellipsoids and tubes at realistic organ sizes (a tumour inside the liver, an
oesophagus at the top), the prediction a perturbed copy (per-class shifts, liver grown, spleen
shrunk, part of the pancreas missing, tumour smaller and off-centre). Then times, per case,

* ``bbox``: :func:`flare_rt.evaluate.metrics.score_case` (what ``flare-rt evaluate`` runs),
* ``official-style``: full-volume masks and DSC per class, NSD on the tight bounding box of the
  two masks, as the official script's SurfaceDice does (its surfel sort left out),
* ``whole-volume``: :func:`flare_rt.evaluate.reference.reference_score_case`,

reports medians over repeats and checks that the three give the same numbers.

    python bench/evaluate_speed.py                      # one case, 3 / 3 / 1 repeats
    python bench/evaluate_speed.py --cases 2 --repeats 5 --json bench/results/evaluate.json
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import scipy
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flare_rt.evaluate.metrics import EvaluationOptions, score_case  # noqa: E402
from flare_rt.evaluate.reference import (  # noqa: E402
    reference_dice,
    reference_score_case,
    reference_surface_dice,
)
from flare_rt.labels import NSD_TOLERANCE_MM, ZRANGE_CUT_IDS  # noqa: E402
from flare_rt.devices import cpu_name  # noqa: E402

log = logging.getLogger("bench.evaluate_speed")

# (label, centre offset from the volume centre in mm (x, y, z), semi-axes in mm)
ELLIPSOIDS = (
    (1, (-60, -10, 40), (85, 75, 70)),  # liver ~1.9 L
    (2, (-70, 50, -30), (30, 28, 55)),  # right kidney
    (3, (90, 40, 40), (45, 30, 55)),  # spleen
    (4, (10, 10, 0), (70, 14, 14)),  # pancreas
    (7, (-45, 40, 50), (12, 5, 20)),  # right adrenal
    (8, (50, 40, 45), (12, 5, 20)),  # left adrenal
    (9, (-45, -50, 5), (18, 15, 35)),  # gallbladder
    (11, (60, -20, 50), (55, 40, 60)),  # stomach
    (12, (-10, 0, -20), (40, 14, 35)),  # duodenum
    (13, (75, 55, -35), (30, 28, 55)),  # left kidney
)
TUMOUR = (14, (-70, -20, 40), (18, 18, 18))  # inside the liver, painted last
# (label, centre (x, y) offset in mm, radius mm, z range in mm from the volume centre)
TUBES = (
    (5, (10, 40), 12, (-140, 120)),  # aorta
    (6, (-20, 35), 11, (-140, 100)),  # inferior vena cava
    (10, (20, 45), 8, (60, 160)),  # oesophagus, up to the top of the volume
)


def _paint(labels: np.ndarray, spacing, label: int, lo_mm, hi_mm, inside: Callable) -> None:
    """Set ``label`` where ``inside(x, y, z)`` (mm grids) holds, within the box [lo_mm, hi_mm]."""
    lo = [max(int(np.floor(a / s)), 0) for a, s in zip(lo_mm, spacing)]
    hi = [min(int(np.ceil(b / s)) + 1, n) for b, s, n in zip(hi_mm, spacing, labels.shape)]
    grids = np.ogrid[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    x, y, z = (g * s for g, s in zip(grids, spacing))
    box = labels[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    box[np.broadcast_to(inside(x, y, z), box.shape)] = label


def phantom(shape, spacing) -> np.ndarray:
    """All 14 FLARE classes, indexed (x, y, z)."""
    labels = np.zeros(shape, np.uint8)
    centre = [n * s / 2 for n, s in zip(shape, spacing)]
    for label, (ox, oy), radius, (z0, z1) in TUBES:
        cx, cy = centre[0] + ox, centre[1] + oy
        _paint(
            labels, spacing, label, (cx - radius, cy - radius, centre[2] + z0),
            (cx + radius, cy + radius, centre[2] + z1),
            lambda x, y, z, cx=cx, cy=cy, r=radius: (x - cx) ** 2 + (y - cy) ** 2 <= r * r,
        )
    for label, offset, semi in (*ELLIPSOIDS, TUMOUR):
        c = [a + b for a, b in zip(centre, offset)]
        _paint(
            labels, spacing, label, [a - r for a, r in zip(c, semi)], [a + r for a, r in zip(c, semi)],
            lambda x, y, z, c=c, r=semi: ((x - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2
            + ((z - c[2]) / r[2]) ** 2 <= 1,
        )
    return labels


def perturbed(gt: np.ndarray, seed: int) -> np.ndarray:
    """A plausible prediction: each class moved by up to 2 voxels and reshaped a little."""
    rng = np.random.default_rng(seed)
    pred = np.zeros_like(gt)
    boxes = ndimage.find_objects(gt)
    for label in np.unique(gt[gt > 0]):
        box = tuple(slice(max(s.start - 3, 0), s.stop + 3) for s in boxes[label - 1])
        mask = gt[box] == label
        if label == 1:
            mask = ndimage.binary_dilation(mask)
        elif label == 3:
            mask = ndimage.binary_erosion(mask, iterations=2)
        elif label == 4:
            mask[: mask.shape[0] // 3] = False
        elif label == 14:
            mask = ndimage.binary_erosion(mask, iterations=3)
        shift = tuple(int(v) for v in rng.integers(-2, 3, 3))
        mask = ndimage.shift(mask.astype(np.uint8), shift, order=0, mode="constant") > 0
        pred[box][mask] = label
    return pred


def official_style(gt, pred, spacing, dsc_cutoff=0.2) -> dict[int, tuple[float, float]]:
    """The official script's work per class: full-volume masks and DSC, NSD on the tight box."""
    out = {}
    for i in range(1, 15):
        g, p = gt == i, pred == i
        if not g.any() or not p.any():
            out[i] = (1.0, 1.0) if not g.any() and not p.any() else (0.0, 0.0)
            continue
        if i in ZRANGE_CUT_IDS:
            z = np.nonzero(g.any(axis=(0, 1)))[0]
            g, p = g[:, :, z.min() : z.max()], p[:, :, z.min() : z.max()]
        dsc = reference_dice(g, p)
        nsd = 0.0
        if not dsc < dsc_cutoff:
            box = ndimage.find_objects((g | p).view(np.uint8))[0]
            nsd = reference_surface_dice(g[box], p[box], spacing, NSD_TOLERANCE_MM[i])
        out[i] = (float(np.round(dsc, 4)), float(np.round(nsd, 4)))
    return out


def timed(fns: dict[str, Callable], repeats: int) -> tuple[dict[str, float], dict[str, object]]:
    """Median seconds of each function, the functions interleaved in every repeat so that a
    change of machine load hits them alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    results: dict[str, object] = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}, results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(512, 512, 300))
    parser.add_argument("--spacing", type=float, nargs=3, default=(0.8, 0.8, 1.0))
    parser.add_argument("--cases", type=int, default=1, help="cases (prediction seeds)")
    parser.add_argument(
        "--repeats", type=int, default=3, help="repeats of the bbox method and the official-style peer"
    )
    parser.add_argument(
        "--reference-repeats", type=int, default=1,
        help="repeats of the whole-volume reference (about 10 min each at full size on 2 cores)",
    )
    parser.add_argument("--no-reference", action="store_true", help="skip the whole-volume peer")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    spacing = tuple(args.spacing)
    log.info(
        "device: CPU only, %s, %d cores; numpy %s, scipy %s, Python %s",
        cpu_name(), os.cpu_count(), np.__version__, scipy.__version__, platform.python_version(),
    )
    start = time.perf_counter()
    gt = phantom(tuple(args.shape), spacing)
    counts = np.bincount(gt.ravel(), minlength=15)
    log.info(
        "case: %s voxels at %s mm, classes present %s (%.1f s to build)",
        "x".join(map(str, args.shape)), "x".join(map(str, spacing)),
        [c for c in range(1, 15) if counts[c]], time.perf_counter() - start,
    )
    rows = []
    for case in range(args.cases):
        pred = perturbed(gt, seed=case)
        score_case(gt[:64, :64, :64], pred[:64, :64, :64], spacing)  # warm-up (imports, table)
        medians, out = timed(
            {
                "bbox_s": lambda: score_case(gt, pred, spacing, EvaluationOptions()),
                "official_style_s": lambda: official_style(gt, pred, spacing),
            },
            args.repeats,
        )
        fast_values = {s.class_id: (s.dsc, s.nsd) for s in out["bbox_s"].scores}
        row = {"case": case, **medians}
        diffs = [out["official_style_s"]]
        if not args.no_reference:
            ref_median, ref_out = timed(
                {"whole_volume_s": lambda: reference_score_case(gt, pred, spacing)}, args.reference_repeats
            )
            row.update(ref_median)
            diffs.append(ref_out["whole_volume_s"])
        row["max_abs_diff"] = max(
            abs(a - b) for other in diffs for c in range(1, 15)
            for a, b in zip(fast_values[c], other[c])
        )
        row["organ_dsc"] = float(np.mean([fast_values[c][0] for c in range(1, 14)]))
        rows.append(row)
        log.info("case %d done: %s", case, {k: round(v, 3) for k, v in row.items() if k != "case"})

    header = "| case | bbox (s) | official-style crop (s) | whole-volume (s) | whole / bbox | crop / bbox | max abs diff |"
    lines = [header, "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        whole = r.get("whole_volume_s")
        lines.append(
            f"| {r['case']} | {r['bbox_s']:.2f} | {r['official_style_s']:.2f} | "
            + (f"{whole:.1f} | {whole / r['bbox_s']:.1f}x" if whole else "– | –")
            + f" | {r['official_style_s'] / r['bbox_s']:.1f}x | {r['max_abs_diff']:.1e} |"
        )
    print("\n".join(lines))
    print(
        f"\nmedian of {args.repeats} interleaved runs (bbox, official-style) and "
        f"{args.reference_repeats} (whole volume); CPU only: {cpu_name()}, {os.cpu_count()} cores, "
        f"load average at the end {os.getloadavg()[0]:.1f}"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {"cpu": cpu_name(), "cores": os.cpu_count(), "shape": args.shape, "spacing": spacing}
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
