"""Where a flare-rt GPU run's start-up time and GPU memory go (torch backend; CuPy allocates through torch's
caching allocator, so torch's counters hold every array of the pipeline).

    python bench/gpu_profile.py CT.nii.gz --bundle B.onnx [--mode fast] [--history] [--json OUT.json]
    python bench/gpu_profile.py CT.nii.gz --bundle B.onnx --variants      # each variant in a fresh process

One process: the start-up phases in order (import flare_rt, import torch, CUDA context, bundle + backend) with
NVML's whole-device reading after each, then the same case twice (cold: graph capture and cuDNN's choice in
it; warm), each stage with its wall time, torch's peak allocated and reserved MiB and NVML's reading at its
end ("window" is the sliding window with the way back, between preprocess and download). ``--history``
records torch's allocation history and lists the live blocks at the cold case's peak by the flare_rt line
that allocated them. ``--variants`` runs flare-rt's configuration and, one change each, those that may move
the peak or the time (expandable segments off, whole-range logits blocks, CUDA graph on, channels-last
weights, cuDNN benchmark off, batch 2, faithful mode), each in a fresh process, and prints one table.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

T_LAUNCH = time.perf_counter()
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
MIB = 1 << 20

LOAD_PHASE = "bundle + backend (network built, weights on the GPU)"
#: name -> (options, environment) of each variant: the default is flare-rt's configuration, each other changes one thing
VARIANTS = {
    "default": ([], {}),
    "no-expandable-segments": ([], {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:False"}),
    "whole-range-blocks": (["--block-rows", "0"], {}),
    "cuda-graph": (["--cuda-graphs"], {}),
    "channels-last": (["--channels-last"], {}),
    "no-cudnn-benchmark": (["--no-cudnn-benchmark"], {}),
    "batch-2": (["--batch-size", "2"], {}),
    "faithful": (["--mode", "faithful"], {}),
}


def site_of(frames) -> str:
    """The innermost flare_rt frame of an allocation (the allocator shim in flare_rt/gpu.py skipped)."""
    for f in frames or ():
        name = f.get("filename", "")
        if "flare_rt" in name and not name.endswith("flare_rt/gpu.py"):
            return f"{name.split('flare_rt/', 1)[-1]}:{f.get('line')} {f.get('name')}"
    return "(outside flare_rt: " + (frames[0].get("name", "?") if frames else "no frames") + ")"


def live_at_peak(trace: list[dict]) -> tuple[int, dict[str, int]]:
    """Peak of the allocated bytes over ``trace`` (torch's device trace) and the live bytes at that moment,
    grouped by allocation site."""
    live: dict[int, tuple[int, str]] = {}
    cur = peak = 0
    peak_at = -1
    for i, ev in enumerate(trace):
        if ev["action"] == "alloc":
            live[ev["addr"]] = (ev["size"], "")
            cur += ev["size"]
            if cur > peak:
                peak, peak_at = cur, i
        elif ev["action"] == "free_completed" and ev["addr"] in live:
            cur -= live.pop(ev["addr"])[0]
    live.clear()
    for ev in trace[:peak_at + 1]:
        if ev["action"] == "alloc":
            live[ev["addr"]] = (ev["size"], site_of(ev.get("frames")))
        elif ev["action"] == "free_completed":
            live.pop(ev["addr"], None)
    sites: dict[str, int] = {}
    for size, site in live.values():
        sites[site] = sites.get(site, 0) + size
    return peak, dict(sorted(sites.items(), key=lambda kv: -kv[1]))


def profile(args) -> dict:
    from gpu_memory import NvmlSource

    nv = NvmlSource(args.gpu_index)
    idle = nv.used_mib()
    phases: list[dict] = []

    @contextmanager
    def phase(name):
        t0 = time.perf_counter()
        yield
        phases.append({"phase": name, "s": round(time.perf_counter() - t0, 3), "nvml_mib": round(nv.used_mib())})

    phases.append({"phase": "interpreter + bench imports", "s": round(time.perf_counter() - T_LAUNCH, 3),
                   "nvml_mib": round(idle)})
    with phase("import flare_rt (pipeline, io)"):
        from flare_rt.backends import create_backend
        from flare_rt.bundle import Bundle
        from flare_rt.io import load_volume
        from flare_rt.pipeline import SegmentOptions, Segmenter, StageTimer
    with phase("import torch"):
        import torch
    from flare_rt.backends.torch_backend import allocator_settings

    allocator_settings(os.environ)  # as the torch backend does, before torch's allocator starts
    with phase("CUDA context (torch)"):
        torch.zeros(1, device="cuda")
        torch.cuda.synchronize()
    with phase("import cupy"):
        from flare_rt.gpu import import_cupy

        import_cupy()
    if args.history:
        torch.cuda.memory._record_memory_history(max_entries=500_000, stacks="python")
    with phase(LOAD_PHASE):
        bundle = Bundle.load(args.bundle)
        backend = create_backend(bundle, "torch", "cuda", args.threads, args.batch_size, cuda_graphs=args.cuda_graphs)
        if args.no_cudnn_benchmark:
            torch.backends.cudnn.benchmark = False
        if args.channels_last:  # NDHWC weights: cuDNN's tensor-core 3D convolutions (a candidate, not a default)
            backend.net = backend.net.to(memory_format=torch.channels_last_3d)
        seg = Segmenter(bundle, backend, SegmentOptions(mode=args.mode, batch_size=args.batch_size))
        if args.block_rows is not None:  # 0: whole finished ranges (the host's setting)
            seg.window = replace(seg.window, block_rows=args.block_rows or None)

    class MemoryTimer(StageTimer):
        """StageTimer that also records torch's peak allocated/reserved per stage and per gap between stages."""

        def __init__(self):
            super().__init__()
            self.rows: list[dict] = []
            self._mark = time.perf_counter()
            torch.cuda.reset_peak_memory_stats()

        def _row(self, name, t0):
            torch.cuda.synchronize()
            self.rows.append({"stage": name, "s": round(time.perf_counter() - t0, 3),
                              "peak_alloc_mib": round(torch.cuda.max_memory_allocated() / MIB),
                              "peak_reserved_mib": round(torch.cuda.max_memory_reserved() / MIB),
                              "end_alloc_mib": round(torch.cuda.memory_allocated() / MIB),
                              "nvml_mib": round(nv.used_mib())})
            torch.cuda.reset_peak_memory_stats()
            self._mark = time.perf_counter()

        @contextmanager
        def __call__(self, name):
            if time.perf_counter() - self._mark > 0.005:
                self._row("window" if name == "download" else f"before {name}", self._mark)
            else:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            with super().__call__(name):
                yield
            self._row(name, t0)

    cases = []
    for label in ("cold", "warm"):
        t0 = time.perf_counter()
        vol = load_volume(args.image)
        read_s = time.perf_counter() - t0
        timer = MemoryTimer()
        t0 = time.perf_counter()
        pred = seg.predict(vol, timer)
        cases.append({"case": label, "read_s": round(read_s, 3), "predict_s": round(time.perf_counter() - t0, 3),
                      "tiles": pred.tiles, "stages": timer.rows,
                      "labels": sorted(int(v) for v in set(pred.labels.ravel()[::97].tolist()))})
        if label == "cold":
            phases.append({"phase": "after the cold case", "s": 0.0, "nvml_mib": round(nv.used_mib())})
    result = {"variant": args.name, "argv": sys.argv[1:], "idle_nvml_mib": round(idle), "phases": phases,
              "cases": cases, "peak_nvml_mib": max(r["nvml_mib"] for c in cases for r in c["stages"]),
              "torch": torch.__version__, "gpu": torch.cuda.get_device_name(0)}
    if args.history:
        snap = torch.cuda.memory._snapshot()
        trace = snap["device_traces"][0]
        peak, sites = live_at_peak(trace)
        result["history"] = {"events": len(trace), "peak_alloc_mib": round(peak / MIB),
                             "live_at_peak_mib": {k: round(v / MIB, 1) for k, v in list(sites.items())[:15]}}
        torch.cuda.memory._record_memory_history(enabled=None)
    return result


def table(results: list[dict]) -> str:
    lines = ["| variant | context+load MiB over idle | cold peak NVML − idle | warm peak NVML − idle | "
             "warm peak alloc (stage) | warm predict s | cold predict s |", "|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['variant']} | failed: {r['error'][:120]} | | | | | |")
            continue
        idle = r["idle_nvml_mib"]
        load = next(ph["nvml_mib"] for ph in r["phases"] if ph["phase"] == LOAD_PHASE) - idle
        cold, warm = r["cases"]
        wpk = max(warm["stages"], key=lambda s: s["peak_alloc_mib"])
        lines.append(f"| {r['variant']} | {load} | {max(s['nvml_mib'] for s in cold['stages']) - idle} | "
                     f"{max(s['nvml_mib'] for s in warm['stages']) - idle} | {wpk['peak_alloc_mib']} "
                     f"({wpk['stage']}) | {warm['predict_s']} | {cold['predict_s']} |")
    return "\n".join(lines)


def run_variants(args) -> list[dict]:
    results = []
    for name, (options, env) in VARIANTS.items():
        if args.only and name not in args.only.split(","):
            continue
        cmd = [sys.executable, __file__, str(args.image), "--bundle", str(args.bundle), "--name", name,
               "--threads", str(args.threads), "--json", "-", *options, *(["--history"] if name == "default" else [])]
        env = {**os.environ, **env}
        t0 = time.perf_counter()
        try:
            p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
            if p.returncode:
                raise RuntimeError((p.stderr.strip().splitlines() or ["exit %d" % p.returncode])[-1])
            r = json.loads(p.stdout)
        except Exception as exc:  # noqa: BLE001 - one variant's failure is reported, the others still run
            r = {"variant": name, "error": f"{type(exc).__name__}: {exc}"}
        r["process_s"] = round(time.perf_counter() - t0, 2)
        results.append(r)
        sys.stderr.write(f"[gpu_profile] {name}: {r.get('error') or 'ok'} ({r['process_s']} s)\n")
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("image", type=Path)
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--mode", default="fast", choices=["fast", "faithful"])
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--cuda-graphs", action="store_true")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--no-cudnn-benchmark", action="store_true")
    p.add_argument("--block-rows", type=int, default=None, help="rows per logits block (0: whole ranges)")
    p.add_argument("--history", action="store_true")
    p.add_argument("--variants", action="store_true")
    p.add_argument("--only", default=None, help="with --variants: these variants (comma-separated) only")
    p.add_argument("--name", default="default")
    p.add_argument("--gpu-index", type=int, default=0)
    p.add_argument("--timeout", type=float, default=90.0)
    p.add_argument("--json", default=None, help="write the result here ('-' = stdout)")
    args = p.parse_args(argv)
    if args.variants:
        results = run_variants(args)
        sys.stdout.write(table(results) + "\n")
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
        return 0 if all("error" not in r for r in results) else 1
    import logging

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    result = profile(args)
    text = json.dumps(result, indent=1)
    if args.json == "-":
        sys.stdout.write(text + "\n")
    else:
        if args.json:
            Path(args.json).write_text(text)
        sys.stdout.write(table([result]) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
