"""Network-only CPU microbenchmark: seconds per tile of each backend × precision × setting on real
tiles, and how far each one's logits are from ONNX Runtime fp32 (the default settings).

The tiles are the ones the pipeline feeds the network for a benchmark CT (fast mode: its own
preprocessing and tile placement). Configurations are interleaved per repeat so that drift of a
shared machine hits all alike; the JSON keeps every sample.

    python bench/cpu_backends.py --bundle FP32.onnx [--variant BF16.onnx] [--variant INT8.onnx] \\
        [--case ircad01] [--tiles 4] [--repeats 3] [--threads 2] [--only ort,ov]

It settles the defaults of ``flare_rt.backends.onnxrt.CpuSettings`` and
``flare_rt.backends.openvino.OvSettings`` and the batch size (see bench/README.md).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(REPO))

from cases import CASES  # noqa: E402
from measure import machine_info  # noqa: E402

from flare_rt.backends.base import BackendOptions  # noqa: E402
from flare_rt.bundle import Bundle  # noqa: E402

log = logging.getLogger("bench.cpu_backends")


@dataclass(frozen=True)
class Config:
    name: str
    backend: str  # "onnxruntime" or "openvino"
    bundle: str  # "fp32" or a variant's precision
    batch: int = 1
    settings: dict = field(default_factory=dict)  # CpuSettings / OvSettings fields


def configs(variants: dict[str, Path], only: set[str]) -> list[Config]:
    out = []
    if "ort" in only:
        for b in (1, 2):
            out.append(Config(f"ort_fp32_b{b}", "onnxruntime", "fp32", b))
        for name, s in (("basic", {"graph_optimization": "basic"}), ("extended", {"graph_optimization": "extended"}),
                        ("noarena", {"mem_arena": False}), ("nopattern", {"mem_pattern": False}),
                        ("nospin", {"spinning": False})):
            out.append(Config(f"ort_fp32_b1_{name}", "onnxruntime", "fp32", 1, s))
    if "ov" in only:
        for b in (1, 2):
            out.append(Config(f"ov_fp32_b{b}", "openvino", "fp32", b))
        out.append(Config("ov_fp32_b1_throughput", "openvino", "fp32", 1, {"performance_hint": "THROUGHPUT"}))
        out.append(Config("ov_fp32_b1_nativenorm", "openvino", "fp32", 1, {"pooled_norm_min_voxels": None}))
        out.append(Config("ov_fp32_b1_pooledall", "openvino", "fp32", 1, {"pooled_norm_min_voxels": 0}))
    for precision in variants:
        for backend, short in (("openvino", "ov"), ("onnxruntime", "ort")):
            if short not in only or (precision == "bf16" and backend != "openvino"):
                continue
            for b in (1, 2):
                out.append(Config(f"{short}_{precision}_b{b}", backend, precision, b))
    return out


def make(cfg: Config, bundles: dict[str, Bundle], threads: int):
    opts = BackendOptions(device="cpu", threads=threads)
    if cfg.backend == "onnxruntime":
        from flare_rt.backends.onnxrt import CpuSettings, OnnxRuntimeBackend

        return OnnxRuntimeBackend(bundles[cfg.bundle], opts, CpuSettings(**cfg.settings))
    from flare_rt.backends.openvino import OpenVinoBackend, OvSettings

    return OpenVinoBackend(bundles[cfg.bundle], opts, OvSettings(**cfg.settings))


def run_tiles(net, tiles: np.ndarray, batch: int) -> tuple[np.ndarray, float, float]:
    """Logits, wall seconds per tile, CPU seconds per tile (this process, all threads)."""
    outs, t0, c0 = [], time.perf_counter(), time.process_time()
    for i in range(0, len(tiles), batch):
        outs.append(np.array(net(tiles[i:i + batch]), copy=True))  # a backend may reuse its buffer
    return np.concatenate(outs), (time.perf_counter() - t0) / len(tiles), (time.process_time() - c0) / len(tiles)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, required=True, help="the fp32 bundle")
    p.add_argument("--variant", type=Path, action="append", default=[], help="bf16/int8 bundle (flare-rt quantize)")
    p.add_argument("--case", default="ircad01", choices=sorted(CASES))
    p.add_argument("--cache", type=Path, default=BENCH / "results" / "cache", help="where ts269 is built")
    p.add_argument("--tiles", type=int, default=4, help="real tiles per measurement (evenly chosen)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", default="ort,ov", help="comma list of ort, ov")
    p.add_argument("--out", type=Path, default=BENCH / "results")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("flare_rt", "nncf"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from flare_rt.quantize import calibration_tiles

    bundles = {"fp32": Bundle.load(args.bundle)}
    for v in args.variant:
        b = Bundle.load(v)
        bundles[b.meta.precision] = b
    image = CASES[args.case].locate(args.cache)
    tiles = calibration_tiles(bundles["fp32"], [image], args.tiles)
    log.info("%d tiles of %s", len(tiles), image.name)
    cfgs = configs({k: v for k, v in bundles.items() if k != "fp32"}, set(args.only.split(",")))
    nets, load_s = {}, {}
    for cfg in cfgs:
        t0 = time.perf_counter()
        nets[cfg.name] = make(cfg, bundles, args.threads)
        nets[cfg.name](tiles[:cfg.batch])  # compile / warm up this batch size
        load_s[cfg.name] = time.perf_counter() - t0
    ref, _, _ = run_tiles(make(Config("ref", "onnxruntime", "fp32"), bundles, args.threads), tiles, 1)
    samples: dict[str, list[float]] = {c.name: [] for c in cfgs}
    cpu: dict[str, list[float]] = {c.name: [] for c in cfgs}
    accuracy = {}
    for r in range(args.repeats):
        for cfg in cfgs:
            out, per_tile, cpu_tile = run_tiles(nets[cfg.name], tiles, cfg.batch)
            samples[cfg.name].append(per_tile)
            cpu[cfg.name].append(cpu_tile)
            if r == 0:
                accuracy[cfg.name] = {"max_abs_vs_ort_fp32": float(np.abs(out - ref).max()),
                                      "ref_max": float(np.abs(ref).max()),
                                      "argmax_agreement_vs_ort_fp32": float((out.argmax(1) == ref.argmax(1)).mean())}
            log.info("repeat %d %s: %.3f s/tile", r + 1, cfg.name, per_tile)
    rows = []
    for cfg in cfgs:
        s = samples[cfg.name]
        rows.append({"config": asdict(cfg), "describe": nets[cfg.name].describe(), "s_per_tile_median": statistics.median(s),
                     "s_per_tile_min": min(s), "samples": s,
                     "cpu_s_per_tile_median": statistics.median(cpu[cfg.name]), "load_s": load_s[cfg.name], **accuracy[cfg.name]})
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"timestamp": stamp, "machine": machine_info(REPO), "case": args.case, "tiles": int(len(tiles)),
              "threads": args.threads, "repeats": args.repeats, "loadavg_end": os.getloadavg(), "rows": rows}
    path = args.out / f"cpu_backends-{stamp}.json"
    path.write_text(json.dumps(result, indent=1, default=str))
    lines = ["| config | backend | s/tile median (min) | CPU s/tile | load s | max abs vs ORT fp32 (ref max) "
             "| argmax agreement |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['config']['name']} | {row['describe']} | {row['s_per_tile_median']:.3f} "
                     f"({row['s_per_tile_min']:.3f}) | {row['cpu_s_per_tile_median']:.3f} | {row['load_s']:.1f} | {row['max_abs_vs_ort_fp32']:.3g} "
                     f"({row['ref_max']:.3g}) | {row['argmax_agreement_vs_ort_fp32']:.5f} |")
    sys.stdout.write("\n".join(lines) + "\n")
    log.info("wrote %s (load average at the end %s)", path, result["loadavg_end"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
