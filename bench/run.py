"""Benchmark of flare-rt against nnU-Net v2's own predictor, measured in the same run, on the CPU or the GPU.

Every system runs as its own subprocess (so peak memory is isolated) on the same input; wall time
covers the whole process (interpreter start, imports, model load, I/O), as the FLARE clock does.
On the GPU, whole-device memory is sampled through NVML as the challenge samples it
(bench/gpu_memory.py). Agreement (Dice, voxel agreement) is computed from the label files the
systems write.

    python bench/run.py                                   # ircad01 + ts269, CPU systems, 3 repeats (~30+ min)
    python bench/run.py --cases small --repeats 1 --systems nnunet,faithful,fast   # quick check (~2 min)
    python bench/run.py --cases ts269 --systems gpu --repeats 2                   # GPU: cold + warm start

See bench/README.md for the columns.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(REPO))

from flare_rt.atomic import atomic_path  # noqa: E402
from flare_rt.resources import shared_models_dir  # noqa: E402
from cases import CASES, DEFAULT_CASES, image_info  # noqa: E402
from measure import agreement, labels_digest, machine_info, read_labels, run_monitored  # noqa: E402
import gpu_memory  # noqa: E402
import gpu_report  # noqa: E402

log = logging.getLogger("bench")

DEFAULT_MODEL_DIR = shared_models_dir() / "ts_demo_small_nnunet"
GOAL_TIME_RATIO = 5.0  # fast mode: <= 1/5 of nnU-Net's wall time
GOAL_MEM_RATIO = 1 / 3  # fast mode: <= 1/3 of nnU-Net's peak RSS


# -- systems -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class System:
    name: str
    kind: str  # "nnunet" (bench/nnunet_peer.py) or "flare" (python -m flare_rt segment)
    args: tuple[str, ...]
    description: str
    device: str = "cpu"  # passed as --device to both kinds
    precision: str = "fp32"  # which bundle: fp32, or a variant made by the `flare-rt quantize` recipe


SYSTEMS: dict[str, System] = {s.name: s for s in [
    System("nnunet", "nnunet", ("--mode", "staged"),
           "nnU-Net v2 nnUNetPredictor, its functions driven stage by stage (step 0.5, Gaussian, no TTA)"),
    System("nnunet_files", "nnunet", ("--mode", "files"),
           "nnU-Net v2 predict_from_files (spawned pre/export workers): check of the staged run"),
    System("faithful", "flare", ("--mode", "faithful"), "flare-rt faithful mode"),
    System("fast", "flare", ("--mode", "fast"), "flare-rt fast mode (all tricks)"),
    System("fast_roi0", "flare", ("--mode", "fast", "--fast-option", "roi=0"),
           "fast without skipping air-only tiles"),
    System("fast_roicrop", "flare", ("--mode", "fast", "--fast-option", "roi_crop=1"),
           "fast plus a crop to the body box (fewer tiles; moves the resampling grid)"),
    System("fast_labelup0", "flare", ("--mode", "fast", "--fast-option", "label_upsampling=0"),
           "fast with nnU-Net's full logits resampling instead of boundary-refined label upsampling"),
    System("fast_f64", "flare", ("--mode", "fast", "--fast-option", "compute_dtype=float64"),
           "fast with float64 image resampling (as nnU-Net)"),
    System("fast_step0.6", "flare", ("--mode", "fast", "--step", "0.6"), "fast with tile step 0.6"),
    System("fast_step0.75", "flare", ("--mode", "fast", "--step", "0.75"), "fast with tile step 0.75"),
    # backend x precision (issue 12); agreement with fast_ort, flare-rt's fp32 reference
    System("fast_ort", "flare", ("--mode", "fast", "--backend", "onnxruntime"),
           "fast on ONNX Runtime, fp32 (the fp32 reference of the precision columns)"),
    System("fast_torch", "flare", ("--mode", "fast", "--backend", "torch"), "fast on PyTorch, fp32"),
    System("fast_ov_fp32", "flare", ("--mode", "fast", "--backend", "openvino"), "fast on OpenVINO, fp32"),
    System("fast_ov_bf16", "flare", ("--mode", "fast", "--backend", "openvino"),
           "fast on OpenVINO, bf16 bundle (bf16 arithmetic)", precision="bf16"),
    System("fast_ov_int8", "flare", ("--mode", "fast", "--backend", "openvino"),
           "fast on OpenVINO, int8 bundle (calibrated on the DICOM patient)", precision="int8"),
    System("fast_ort_int8", "flare", ("--mode", "fast", "--backend", "onnxruntime"),
           "fast on ONNX Runtime, int8 bundle", precision="int8"),
    System("fast_ov_fp32_b2", "flare", ("--mode", "fast", "--backend", "openvino", "--batch-size", "2"),
           "fast on OpenVINO, fp32, two tiles per call"),
    # GPU systems: the same commands with --device cuda; flare-rt per GPU backend
    System("cuda_nnunet", "nnunet", ("--mode", "staged"),
           "nnU-Net v2 nnUNetPredictor on the GPU (perform_everything_on_device, step 0.5, Gaussian, no TTA)", "cuda"),
    System("cuda_torch_fast", "flare", ("--mode", "fast", "--backend", "torch"), "flare-rt fast mode, torch CUDA",
           "cuda"),
    System("cuda_torch_faithful", "flare", ("--mode", "faithful", "--backend", "torch"),
           "flare-rt faithful mode, torch CUDA", "cuda"),
    System("cuda_tensorrt_fast", "flare", ("--mode", "fast", "--backend", "tensorrt"),
           "flare-rt fast mode, TensorRT", "cuda"),
    System("cuda_tensorrt_faithful", "flare", ("--mode", "faithful", "--backend", "tensorrt"),
           "flare-rt faithful mode, TensorRT", "cuda"),
]}
ABLATIONS = ("fast_roi0", "fast_roicrop", "fast_labelup0", "fast_f64", "fast_step0.6", "fast_step0.75")
PRECISIONS = ("fast_ort", "fast_ov_fp32", "fast_ov_bf16", "fast_ov_int8")
DEFAULT_SYSTEMS = ("nnunet", "faithful", "fast", *ABLATIONS)
GPU_SYSTEMS = ("cuda_nnunet", "cuda_torch_fast", "cuda_torch_faithful")
TENSORRT_SYSTEMS = ("cuda_tensorrt_fast", "cuda_tensorrt_faithful")
GROUPS = {"default": DEFAULT_SYSTEMS, "ablations": ABLATIONS, "precisions": PRECISIONS,
          "all": tuple(n for n, s in SYSTEMS.items() if s.device == "cpu"),  # every CPU system
          "gpu": GPU_SYSTEMS, "tensorrt": TENSORRT_SYSTEMS}
#: On-disk caches a run may fill (flare-rt's own: CuPy kernels, later TensorRT engines; torch/Triton's).
#: Every (case, system) gets a fresh folder for them: its first run starts cold, the later ones warm.
CACHE_ENV = {"FLARE_RT_CACHE": "", "CUPY_CACHE_DIR": "cupy", "TRITON_CACHE_DIR": "triton",
             "TORCHINDUCTOR_CACHE_DIR": "inductor", "CUDA_CACHE_PATH": "nv"}
FP32_REFERENCE = "fast_ort"  # the precision columns compare with this system's labels


def parse_list(value: str, known, groups: dict | None = None, what: str = "item") -> list[str]:
    out: list[str] = []
    for item in (v.strip() for v in value.split(",") if v.strip()):
        names = (groups or {}).get(item, (item,))
        for name in names:
            if name not in known:
                raise argparse.ArgumentTypeError(
                    f"unknown {what} {name!r}; choose from {', '.join(known)}"
                    + (f" or the groups {', '.join(groups)}" if groups else ""))
            if name not in out:
                out.append(name)
    return out


# -- one run -------------------------------------------------------------------------------------------
def command(system: System, image: Path, out: Path, report: Path, bundle: Path, args,
            network_labels: bool = True) -> list[str]:
    """The command line of one run. ``network_labels``: a flare-rt run also saves its network-resolution
    argmax (for the agreement columns; an argmax over every blended logit, ~1 s on ts269 on 2 cores, that
    a user's run does not do), so only the first repeat asks for it."""
    if system.kind == "nnunet":
        return [sys.executable, str(BENCH / "nnunet_peer.py"), str(image), str(out), "--model-dir",
                str(args.model_dir), "--fold", args.fold, "--threads", str(args.threads), "--report", str(report),
                "--device", system.device, *system.args]
    return [sys.executable, "-m", "flare_rt", "segment", str(image), str(out), "--model", str(bundle),
            "--threads", str(args.threads), "--report", str(report), "--overwrite", "--device", system.device,
            *(["--save-network-labels", str(network_labels_path(out))] if network_labels else []), *system.args]


def network_labels_path(out: Path) -> Path:
    """Where a flare-rt run saves its network-resolution argmax (beside its label file)."""
    return out.with_name(out.name.replace(".nii.gz", ".net.npz"))


def environment(system: System, threads: int, cache: Path | None = None) -> tuple[dict, dict]:
    """Environment of a run and the variables set on top of ours (recorded in the JSON). ``cache``: the
    folder holding every on-disk cache of this (case, system) (see ``CACHE_ENV``)."""
    extra = {"PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
             "PYTHONUNBUFFERED": "1"}
    if system.kind == "nnunet":
        extra["nnUNet_def_n_proc"] = str(threads)  # nnU-Net's own torch-thread cap for window and export
    if cache is not None:
        extra.update({k: str(cache / sub) if sub else str(cache) for k, sub in CACHE_ENV.items()})
    return {**os.environ, **extra}, extra


def stages(system: System, report: dict | None, wall: float | None) -> dict[str, float | None]:
    """Map a run's report onto common stage names (seconds; None where the system does not report it).

    startup+exit = wall time not covered by the report's stages (interpreter start, imports, teardown)."""
    keys = ("startup", "model_load", "read", "preprocess", "network", "window_other", "export", "write",
            "predict_from_files")
    s = dict.fromkeys(keys)
    if not report or wall is None:
        return s
    t = report.get("timings_s", {})
    if system.kind == "nnunet" and "window" in t:
        s.update(model_load=t["model_load"], read=t["read"], preprocess=t["preprocess"], network=t["network"],
                 window_other=t["window"] - t["network"], export=t["export"], write=t["write"])
    elif system.kind == "nnunet":  # predict_from_files: one block (read to write, spawned workers)
        s.update(model_load=t.get("model_load"), predict_from_files=t.get("predict_from_files"))
    else:
        s.update(model_load=t.get("model_load"), read=t.get("read"), preprocess=t.get("preprocess"),
                 network=t.get("network"), write=t.get("write"))
        # flare-rt reports blending together with the logits/labels resampling ("blend+resample")
        if "blend+resample" in t or "export" in t:
            s["export"] = t.get("blend+resample", 0.0) + t.get("export", 0.0)
    s["startup"] = wall - sum(v for v in s.values() if v is not None)
    return s


def stage_times(system: System, report: dict | None, wall: float | None) -> dict[str, float]:
    """Per-stage seconds for the stage breakdown, in the order the system reports them.

    flare-rt: every key of the report's ``timings_s`` passed through as it is (the GPU pipeline adds
    stages such as ``upload``/``download``; none is hard-coded), ``startup`` = wall − their sum
    (interpreter, imports, teardown). nnU-Net: the common mapping of :func:`stages`."""
    if not report or wall is None:
        return {}
    if system.kind == "nnunet":
        return {k: v for k, v in stages(system, report, wall).items() if v is not None}
    t = {k: float(v) for k, v in report.get("timings_s", {}).items() if isinstance(v, (int, float))}
    return {"startup": wall - sum(t.values()), **t}


def run_once(system: System, case: str, image: Path, rep: str, work: Path, bundle: Path, args,
             gpu_source=None, timeout_s: float | None = None) -> dict:
    d = work / case
    d.mkdir(parents=True, exist_ok=True)
    out = d / f"{system.name}.nii.gz"
    report_path = d / f"{system.name}.{rep}.json"
    report_path.unlink(missing_ok=True)
    cache = d / ("cache-warmup" if rep == "warmup" else "cache") / system.name
    start = "warm" if cache.is_dir() else "cold"
    cache.mkdir(parents=True, exist_ok=True)
    env, extra_env = environment(system, args.threads, cache)
    wanted = system.device == "cpu" and FP32_REFERENCE in args.system_names  # only vs_fp32 compares them
    cmd = command(system, image, out, report_path, bundle, args, network_labels=wanted and rep in ("warmup", "r1"))
    load = os.getloadavg()[0]
    sampler = gpu_memory.GpuMemorySampler(gpu_source, device=args.gpu_name) if gpu_source is not None else None
    res = run_monitored(cmd, d / f"{system.name}.{rep}", env=env, cwd=REPO, timeout_s=timeout_s or args.timeout,
                        gpu_sampler=sampler)
    report = None
    if res.ok:
        try:
            report = json.loads(report_path.read_text())
        except (OSError, ValueError) as exc:
            res.stderr_tail = f"exit 0 but no readable --report {report_path}: {exc}"
    ok = res.ok and report is not None and out.is_file()
    if res.ok and not out.is_file():
        res.stderr_tail = f"exit 0 but no output {out}"
    run = {"rep": rep, "start": start, "ok": ok, "returncode": res.returncode, "timed_out": res.timed_out,
           "wall_s": res.wall_s, "device": args.device_names[system.device],
           "backend": (report or {}).get("backend"),
           "peak_rss_gb": res.peak_rss_bytes / 1e9, "ru_maxrss_gb": (res.ru_maxrss_bytes or 0) / 1e9,
           "cpu_s": res.cpu_s, "samples": res.n_samples, "max_processes": res.max_processes,
           "loadavg_1min_before": round(load, 2), "cmd": res.cmd, "env_set": extra_env,
           "stderr_tail": res.stderr_tail, "report": report, "stages": stages(system, report, res.wall_s),
           "stage_times": stage_times(system, report, res.wall_s), "gpu_memory": res.extra.get("gpu_memory"),
           "output": str(out)}
    if ok:
        run["labels_digest"] = labels_digest(out)
    return run


# -- summaries -----------------------------------------------------------------------------------------
def _stats(values: list[float]) -> dict | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def _start_summary(runs: list[dict]) -> dict:
    """Wall time, whole-device GPU memory and stage medians of the runs of one start kind."""
    out = {"n": len(runs), "wall_s": _stats([r["wall_s"] for r in runs])}
    mems = [gpu_memory.summary(r.get("gpu_memory")) for r in runs if r.get("gpu_memory")]
    for key in ("max_mib", "max_minus_idle_mib", "auc_mib_s"):
        out[f"gpu_{key}"] = _stats([m[key] for m in mems])
    keys = list(dict.fromkeys(k for r in runs for k in r.get("stage_times", {})))
    out["stage_times_median_s"] = {k: (_stats([r["stage_times"].get(k) for r in runs]) or {}).get("median")
                                   for k in keys}
    return out


def typical(summary: dict) -> dict | None:
    """The runs a system is compared by: its warm starts where it had any, else its cold start."""
    return summary.get("warm") or summary.get("cold")


def summarise(runs: list[dict]) -> dict:
    good = [r for r in runs if r["ok"]]
    s = {"ok": bool(good), "runs_ok": len(good), "runs": len(runs)}
    if not runs:
        s.update(error="not run", stderr_tail="")
        return s
    if not good:
        bad = runs[-1]
        error = ("skipped (time budget)" if bad.get("skipped") else
                 f"rc={bad.get('returncode')}" + (" (timeout)" if bad.get("timed_out") else ""))
        s.update(error=error, stderr_tail=bad.get("stderr_tail", ""))
        return s
    s["wall_s"] = _stats([r["wall_s"] for r in good])
    s["peak_rss_gb"] = _stats([r["peak_rss_gb"] for r in good])
    s["cpu_s"] = _stats([r["cpu_s"] for r in good])
    s["stages_median_s"] = {k: (_stats([r["stages"][k] for r in good]) or {}).get("median")
                            for k in good[0]["stages"]}
    # cold start (first run with an empty cache folder) and warm starts (the cache filled), kept apart
    for start in ("cold", "warm"):
        runs_ = [r for r in good if r.get("start") == start]
        if runs_:
            s[start] = _start_summary(runs_)
    rep = good[0]["report"] or {}
    s["tiles"] = rep.get("tiles")
    s["network_shape"] = rep.get("network_shape")
    s["backend"] = rep.get("backend")
    s["device"] = good[0].get("device")
    digests = {r.get("labels_digest") for r in good}
    s["repeats_identical"] = len(digests) == 1
    if len(good) < len(runs):
        s["failed_runs"] = [{"rep": r["rep"], "returncode": r["returncode"], "stderr_tail": r["stderr_tail"]}
                            for r in runs if not r["ok"]]
    return s


def label_names(model_dir: Path) -> dict[int, str]:
    try:
        labels = json.loads((model_dir / "dataset.json").read_text())["labels"]
        return {int(v): k for k, v in labels.items() if isinstance(v, int)}
    except (OSError, ValueError, KeyError):
        return {}


def references(name: str, ok: set[str]) -> dict[str, str]:
    """The systems ``name``'s labels are compared with: ``vs_nnunet`` (nnU-Net on the same device),
    ``vs_faithful`` (fast variants: flare-rt faithful on the same device and backend) and ``vs_cpu``
    (GPU fast variants: the CPU fast mode)."""
    system = SYSTEMS[name]
    refs = {}
    if system.device == "cuda":
        nn = "cuda_nnunet" if "cuda_nnunet" in ok else None
        backend = name.split("_")[1] if system.kind == "flare" else None
        mode = name.split("_", 2)[2] if system.kind == "flare" else None
        if mode == "fast":
            if f"cuda_{backend}_faithful" in ok:
                refs["vs_faithful"] = f"cuda_{backend}_faithful"
            if "fast" in ok:
                refs["vs_cpu"] = "fast"
    else:
        nn = next((n for n in ("nnunet", "nnunet_files") if n in ok), None)
        if name.startswith("fast") and "faithful" in ok:
            refs["vs_faithful"] = "faithful"
    if nn and nn != name:
        refs["vs_nnunet"] = nn
    return refs


def add_agreement(case_result: dict, names: dict[int, str]) -> None:
    systems = case_result["systems"]
    ok = {n for n, e in systems.items() if e.get("summary", {}).get("ok")}
    cache: dict[str, object] = {}

    def labels(name):
        if name not in cache:
            cache[name] = read_labels(Path(systems[name]["output"]))
        return cache[name]

    for name in sorted(ok, key=list(systems).index):
        summ = systems[name]["summary"]
        for key, ref_name in references(name, ok).items():
            summ[key] = agreement(labels(ref_name), labels(name), names)
            summ[key]["reference"] = ref_name
        if FP32_REFERENCE in ok and name != FP32_REFERENCE and SYSTEMS[name].kind == "flare" \
                and SYSTEMS[name].device == "cpu":
            summ["vs_fp32"] = agreement(labels(FP32_REFERENCE), labels(name), names)
            if "error" not in summ["vs_fp32"]:
                summ["vs_fp32"]["network_agreement"] = network_agreement(
                    Path(systems[FP32_REFERENCE]["output"]), Path(systems[name]["output"]))
        nn = summ.get("vs_nnunet", {}).get("reference") or (name if SYSTEMS[name].kind == "nnunet" else None)
        if not nn:
            continue
        ref = systems[nn]["summary"]
        if SYSTEMS[name].device == "cuda":  # the same card: warm starts where there are any
            sys_t, ref_t = typical(summ), typical(ref)
            summ["time_ratio"] = ref_t["wall_s"]["median"] / sys_t["wall_s"]["median"]
            if sys_t.get("gpu_max_mib") and ref_t.get("gpu_max_mib"):
                summ["gpu_mem_ratio"] = sys_t["gpu_max_mib"]["median"] / ref_t["gpu_max_mib"]["median"]
        else:
            summ["time_ratio"] = ref["wall_s"]["median"] / summ["wall_s"]["median"]
            summ["mem_ratio"] = summ["peak_rss_gb"]["median"] / ref["peak_rss_gb"]["median"]


def network_agreement(ref_out: Path, out: Path) -> float | None:
    """Voxel argmax agreement at network resolution of two flare-rt runs (None when not comparable)."""
    import numpy as np

    try:
        a, b = (np.load(network_labels_path(p))["labels"] for p in (ref_out, out))
    except (OSError, KeyError, ValueError):
        return None
    return float((a == b).mean()) if a.shape == b.shape else None


# -- Markdown ------------------------------------------------------------------------------------------
def _f(v, fmt="{:.1f}", dash="—"):
    return dash if v is None else fmt.format(v)


def _range(st: dict | None, fmt: str) -> str:
    if not st:
        return "—"
    if st["n"] == 1:
        return fmt.format(st["median"])
    return f"{fmt.format(st['median'])} ({fmt.format(st['min'])}–{fmt.format(st['max'])})"


def _dice(a: dict | None) -> tuple[str, str]:
    if not a:
        return "—", "—"
    if "error" in a:
        return a["error"], "—"
    md = "—" if a["min_dice"] is None else f"{a['min_dice']:.4f} ({a['min_dice_class']})"
    return md, f"{a['voxel_agreement']:.5f}"


def _files_note(case_result: dict) -> str:
    s = case_result["systems"].get("nnunet_files", {}).get("summary", {})
    block = s.get("stages_median_s", {}).get("predict_from_files") if s.get("ok") else None
    if block is None:
        return ""
    return (f" nnunet_files runs predict_from_files as one block of {block:.2f} s (read to write, with its spawned "
            "preprocessing and export workers), not split into the columns.")


def markdown(result: dict) -> str:
    if any(SYSTEMS[n].device == "cuda" for n in result["config"]["systems"]):
        return gpu_report.markdown(result)
    return cpu_markdown(result)


def cpu_markdown(result: dict) -> str:
    m, cfg = result["machine"], result["config"]
    v = m["versions"]
    backends = sorted({s["summary"].get("backend") for c in result["cases"].values() for n, s in c["systems"].items()
                       if s["summary"].get("ok") and SYSTEMS[n].kind == "flare" and s["summary"].get("backend")})
    lines = [f"# flare-rt CPU benchmark — {result['timestamp']}", "",
             f"- Machine: {m['cpu_model']}, {m['logical_cores']} logical cores ({m['physical_cores']} physical, "
             f"{m['usable_cores']} usable), {m['ram_gb']} GB RAM, no GPU; load average at start "
             f"{', '.join(map(str, m['loadavg_at_start']))}",
             f"- Software: Python {m['python']}, torch {v['torch']}, onnxruntime {v['onnxruntime']}, "
             f"nnunetv2 {v['nnunetv2']}, flare-rt {v['flare-rt']} (git {m['git_commit']}"
             f"{', flare_rt/ modified' if m['flare_rt_dirty'] else ''})",
             f"- flare-rt backend: {', '.join(backends) or '—'}; threads {cfg['threads']} for every system; "
             f"bundle {Path(cfg['bundle']).name} (fp32, from {Path(cfg['model_dir']).name} fold {cfg['fold']})",
             f"- nnU-Net peer: nnUNetPredictor on CPU, tile step 0.5, Gaussian, no mirroring, "
             f"perform_everything_on_device=False, torch threads {cfg['threads']}",
             f"- Repeats: {cfg['repeats']} (median, (min–max) when >1), warm-up {'on' if cfg['warmup'] else 'off'}; "
             "wall = whole process (start-up, imports, model load, I/O)"
             + ("; flare-rt's first run (warm-up or r1) also saves its network-resolution argmax for the agreement "
                "columns (an extra argmax, ~1 s on ts269)" if FP32_REFERENCE in cfg["systems"] else ""),
             f"- Peak RSS: {m['sampler']}", ""]
    for case, c in result["cases"].items():
        info = c["info"]
        lines += [f"## {case}: {c['description']}", "",
                  f"Input {info['path']} — {'×'.join(map(str, info['size_xyz']))} voxels, spacing "
                  f"{'×'.join(map(str, info['spacing_xyz']))} mm.", "",
                  "| system | wall s | peak RSS GB | time ratio (nnU-Net/system) | mem ratio (system/nnU-Net) "
                  "| network s | tiles | min Dice vs nnU-Net (class) | voxel agreement vs nnU-Net "
                  "| min Dice vs faithful (class) | voxel agreement vs faithful "
                  f"| min Dice vs fp32 {FP32_REFERENCE} (class) | network argmax agreement vs fp32 |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        failures = []
        for name, entry in c["systems"].items():
            s = entry["summary"]
            if not s.get("ok"):
                lines.append(f"| {name} | FAILED {s.get('error', '')} | — | — | — | — | — | — | — | — | — | — | — |")
                failures.append((name, s.get("stderr_tail", "")))
                continue
            d_nn, a_nn = _dice(s.get("vs_nnunet"))
            d_fa, a_fa = _dice(s.get("vs_faithful"))
            d_32, _ = _dice(s.get("vs_fp32"))
            n_32 = _f((s.get("vs_fp32") or {}).get("network_agreement"), "{:.5f}")
            if name == FP32_REFERENCE:
                d_32 = n_32 = "reference"
            if name in ("nnunet", "nnunet_files") and "vs_nnunet" not in s:
                d_nn, a_nn = "reference", "reference"
            flag = "" if s["repeats_identical"] else " ⚠ outputs differ across repeats"
            lines.append(
                f"| {name}{flag} | {_range(s['wall_s'], '{:.1f}')} | {_range(s['peak_rss_gb'], '{:.2f}')} "
                f"| {_f(s.get('time_ratio'), '{:.2f}×')} | {_f(s.get('mem_ratio'), '{:.2f}')} "
                f"| {_f(s['stages_median_s'].get('network'))} | {_f(s.get('tiles'), '{}')} "
                f"| {d_nn} | {a_nn} | {d_fa} | {a_fa} | {d_32} | {n_32} |")
        fast = c["systems"].get("fast", {}).get("summary", {})
        if fast.get("time_ratio") is not None:
            tr, mr = fast["time_ratio"], fast["mem_ratio"]
            lines += ["", "Goals for fast mode against nnU-Net on this case:",
                      f"- time ≤ 1/5 of nnU-Net's (ratio ≥ {GOAL_TIME_RATIO:.0f}×): {tr:.2f}× — "
                      f"**{'reached' if tr >= GOAL_TIME_RATIO else 'not reached'}**",
                      f"- peak memory ≤ 1/3 of nnU-Net's (ratio ≤ {GOAL_MEM_RATIO:.2f}): {mr:.2f} — "
                      f"**{'reached' if mr <= GOAL_MEM_RATIO else 'not reached'}**"]
        lines += ["", f"Stages of {case} (median seconds; startup+exit = wall − reported stages):", "",
                  "| system | startup+exit | model load | read | preprocess | network | window other "
                  "| export/resample | write | wall | CPU s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, entry in c["systems"].items():
            s = entry["summary"]
            if not s.get("ok"):
                continue
            st = s["stages_median_s"]
            cols = [_f(st.get(k), "{:.2f}") for k in ("startup", "model_load", "read", "preprocess", "network",
                                                       "window_other", "export", "write")]
            lines.append(f"| {name} | {' | '.join(cols)} | {s['wall_s']['median']:.1f} | "
                         f"{_f(s['cpu_s']['median'] if s['cpu_s'] else None)} |")
        lines += ["", "window other: nnU-Net's sliding window minus its forward passes (tile copies, Gaussian "
                  "weighting, fp16 accumulation). flare-rt reports blending together with the resampling back "
                  "to the input grid, so for flare-rt that time is under export/resample."
                  + _files_note(c)]
        for name, tail in failures:
            lines += ["", f"<details><summary>{name} failed: stderr tail</summary>", "", "```", tail, "```",
                      "", "</details>"]
        lines.append("")
    return "\n".join(lines)


# -- main ----------------------------------------------------------------------------------------------
def ensure_bundle(args) -> tuple[Path, str | None]:
    """The flare-rt bundle (made once with ``flare-rt import-nnunet`` if absent) and an error, if any."""
    bundle = args.bundle or args.cache / f"{args.model_dir.name}_fold{args.fold}_fp32.onnx"
    if bundle.is_file() and not args.rebuild_bundle:
        return bundle, None
    bundle.parent.mkdir(parents=True, exist_ok=True)
    args.cache.mkdir(parents=True, exist_ok=True)
    log.info("creating the flare-rt bundle %s from %s (once)", bundle, args.model_dir)
    res = run_monitored([sys.executable, "-m", "flare_rt", "import-nnunet", str(args.model_dir), str(bundle),
                         "--fold", args.fold, "--precision", "fp32", "--overwrite"], args.cache / "import-nnunet",
                        env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO, timeout_s=args.timeout)
    if not res.ok:
        log.error("flare-rt import-nnunet failed (rc=%s): flare-rt systems will be reported as failed\n%s",
                  res.returncode, res.stderr_tail)
        return bundle, f"bundle creation failed (import-nnunet rc={res.returncode}):\n{res.stderr_tail}"
    return bundle, None


def variant_command(fp32: Path, out: Path, precision: str, cache: Path, threads: int) -> list[str]:
    """The shipped `flare-rt quantize` recipe: int8 calibrated on the DICOM patient (not a benchmark
    case), agreement measured on both benchmark CTs (ircad01 and ts269)."""
    from cases import DATA

    cmd = [sys.executable, "-m", "flare_rt", "quantize", str(fp32), str(out), "--precision", precision,
           "--check", str(CASES["ircad01"].locate(cache)), "--check", str(CASES["ts269"].locate(cache)),
           "--threads", str(threads), "--overwrite"]  # made when absent, or again with --rebuild-bundle
    return cmd + (["--calibration", str(DATA / "ts_dicom")] if precision == "int8" else [])


def ensure_variant(args, fp32: Path, precision: str) -> tuple[Path, str | None]:
    """The bf16/int8 bundle made once from ``fp32`` with :func:`variant_command`, and an error, if any."""
    out = fp32.with_name(fp32.name.replace("_fp32.onnx", "") + f"_{precision}.onnx")
    if out.is_file() and not args.rebuild_bundle:
        return out, None
    log.info("creating the %s variant %s (once; segments both benchmark CTs twice)", precision, out)
    res = run_monitored(variant_command(fp32, out, precision, args.cache, args.threads),
                        args.cache / f"quantize-{precision}", env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO,
                        timeout_s=args.timeout)
    if not res.ok:
        log.error("flare-rt quantize %s failed (rc=%s)\n%s", precision, res.returncode, res.stderr_tail)
        return out, f"variant creation failed (quantize rc={res.returncode}):\n{res.stderr_tail}"
    return out, None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="CPU benchmark: flare-rt vs nnU-Net v2's predictor (see bench/README.md)")
    p.add_argument("--cases", default=",".join(DEFAULT_CASES),
                   help=f"comma list of {', '.join(CASES)} (default {','.join(DEFAULT_CASES)})")
    p.add_argument("--systems", default="default",
                   help=f"comma list of {', '.join(SYSTEMS)} or the groups {', '.join(GROUPS)} "
                        f"(default: {','.join(DEFAULT_SYSTEMS)})")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per case and system (default 3)")
    p.add_argument("--warmup", action="store_true", help="one untimed run of each system per case first")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for every system (default 2)")
    p.add_argument("--out", type=Path, default=BENCH / "results", help="results folder (default bench/results)")
    p.add_argument("--cache", type=Path, default=None, help="bundle and built cases (default OUT/cache)")
    p.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR, help="nnU-Net v2 model folder")
    p.add_argument("--fold", default="0")
    p.add_argument("--bundle", type=Path, default=None, help="flare-rt bundle (default: made once in the cache)")
    p.add_argument("--rebuild-bundle", action="store_true", help="re-create the cached bundle")
    p.add_argument("--prepare-only", action="store_true",
                   help="create the bundle and the cached cases (e.g. ts269), then exit without timing")
    p.add_argument("--timeout", type=float, default=3600, help="seconds before a run is killed (default 3600)")
    p.add_argument("--repeats-for", action="append", default=[], metavar="SYSTEM=N",
                   help="timed runs for one system instead of --repeats (repeatable), e.g. cuda_nnunet=1")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for the whole benchmark from the GPU prime on, less a reserve for the agreement "
                        "computations: a run that would not fit (the last run of that system x 1.5 when there is "
                        "one) is skipped and reported as such")
    p.add_argument("--order", choices=["interleaved", "system"], default="interleaved",
                   help="interleaved (default): each repeat runs every system, so drift hits all alike; system: "
                        "all runs of a system before the next, in --systems order (a --budget then cuts the last "
                        "systems, not the warm runs of the first)")
    p.add_argument("--gpu-index", type=int, default=0, help="NVML index of the GPU whose memory is sampled")
    p.add_argument("--no-prime", action="store_true",
                   help="GPU systems: skip the untimed start-up that loads torch/CuPy into the page cache first")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def parse_repeats_for(items: list[str], systems: list[str], default: int) -> dict[str, int]:
    counts = dict.fromkeys(systems, default)
    for item in items:
        name, _, n = item.partition("=")
        if name not in counts or not n.isdigit() or int(n) < 1:
            raise argparse.ArgumentTypeError(f"--repeats-for {item!r}: expected SYSTEM=N with SYSTEM one of the "
                                             f"selected systems ({', '.join(systems)}) and N >= 1")
        counts[name] = int(n)
    return counts


def open_gpu(index: int):
    """NVML source of the sampled GPU and its description (raises GpuUnavailableError)."""
    source = gpu_memory.NvmlSource(index)
    return source, source.describe()


def prime(args, work: Path) -> dict:
    """Untimed start-up of torch (and CuPy, where installed) on the GPU, so the first timed system does not
    alone pay for reading their libraries from disk. It runs with its own throwaway cache folder."""
    code = ("import importlib.util, torch; torch.zeros(1, device='cuda'); "
            "x = torch.zeros(1, 1, 8, 8, 8, device='cuda', dtype=torch.half); "
            "torch.nn.functional.conv3d(x, torch.zeros(1, 1, 3, 3, 3, device='cuda', dtype=torch.half)); "
            "torch.cuda.synchronize(); "  # cuDNN's sub-libraries load on the first convolution
            "cp = importlib.util.find_spec('cupy') and __import__('cupy'); cp and cp.zeros(1).sum()")
    cache = work / "cache-prime"
    env = {**os.environ, **{k: str(cache / sub) if sub else str(cache) for k, sub in CACHE_ENV.items()}}
    res = run_monitored([sys.executable, "-c", code], work / "prime", env=env, cwd=REPO, timeout_s=120)
    log.info("primed the page cache (torch, cuDNN%s): %.1f s%s", "/CuPy", res.wall_s or 0,
             "" if res.ok else f", failed rc={res.returncode}: {res.stderr_tail}")
    return {"ok": res.ok, "wall_s": res.wall_s, "returncode": res.returncode}


def run_order(reps: list[str], systems: list[str], order: str) -> list[tuple[str, str]]:
    """(repeat, system) pairs of one case: ``interleaved``, each repeat runs every system; ``system``, all
    repeats of one system before the next (the warm-up stays first: it primes every system)."""
    if order == "interleaved":
        return [(rep, name) for rep in reps for name in systems]
    warm = [("warmup", name) for name in systems if "warmup" in reps]
    return warm + [(rep, name) for name in systems for rep in reps if rep != "warmup"]


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


AGREEMENT_RESERVE_S = 3.0  # per system and case: reading labels and comparing them after the last run


def budget_left(args, t_bench: float) -> float:
    """Seconds of ``--budget`` the runs may still use (a reserve is kept for the agreement computations)."""
    if args.budget is None:
        return float("inf")
    reserve = AGREEMENT_RESERVE_S * len(args.system_names) * len(args.case_names)
    return args.budget - reserve - (time.perf_counter() - t_bench)


def over_budget(args, t_bench: float, previous: list[dict]) -> str | None:
    """Why the next run is skipped, or None: less than 5 s of ``--budget`` left, or less than 1.5 times
    the last run of the same system. (A first run gets what is left as its timeout.)"""
    left = budget_left(args, t_bench)
    walls = [r["wall_s"] for r in previous if r.get("wall_s")]
    need = 1.5 * walls[-1] if walls else 5.0
    if need > left:
        return f"skipped: {max(left, 0):.0f} s of the --budget left, this run may need {need:.0f} s"
    return None


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        case_names = parse_list(args.cases, CASES, what="case")
        system_names = parse_list(args.systems, SYSTEMS, GROUPS, what="system")
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    args.case_names, args.system_names = case_names, system_names
    try:
        repeats = parse_repeats_for(args.repeats_for, system_names, args.repeats)
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    try:
        import psutil  # noqa: F401
    except ImportError:
        parser.error("psutil is needed for the memory sampler: pip install psutil")
    args.cache = args.cache or args.out / "cache"
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    work = args.out / stamp
    gpu_source, gpu_info = None, None
    if any(SYSTEMS[n].device == "cuda" for n in system_names) and not args.prepare_only:
        try:
            gpu_source, gpu_info = open_gpu(args.gpu_index)
        except gpu_memory.GpuUnavailableError as exc:
            parser.error(f"GPU systems selected but the GPU cannot be sampled: {exc}")
    args.gpu_name = gpu_info["name"] if gpu_info else None

    bundle, bundle_error = (ensure_bundle(args) if any(SYSTEMS[n].kind == "flare" for n in system_names)
                            else (None, None))
    bundles, bundle_errors = {"fp32": bundle}, {"fp32": bundle_error}
    for precision in sorted({SYSTEMS[n].precision for n in system_names} - {"fp32"}):
        bundles[precision], bundle_errors[precision] = (
            ensure_variant(args, bundle, precision) if not bundle_error else (None, bundle_error))
    if args.prepare_only:
        for case in case_names:
            log.info("%s: %s", case, image_info(CASES[case].locate(args.cache)))
        for precision, path in bundles.items():
            log.info("%s bundle: %s%s", precision, path, f" ({bundle_errors[precision]})" if bundle_errors[precision]
                     else "")
        return 1 if any(bundle_errors.values()) else 0
    work.mkdir(parents=True, exist_ok=True)
    machine = machine_info(REPO)
    if gpu_info:
        machine["gpu"] = gpu_info
        machine["gpu_memory_method"] = gpu_memory.METHOD
    args.device_names = {"cpu": f"CPU: {machine['cpu_model']}", "cuda": args.gpu_name}
    result = {"timestamp": stamp, "machine": machine,
              "config": {"cases": case_names, "systems": system_names, "repeats": args.repeats,
                         "repeats_per_system": repeats, "budget_s": args.budget,
                         "warmup": args.warmup, "threads": args.threads, "model_dir": str(args.model_dir),
                         "fold": args.fold, "bundle": str(bundle), "timeout_s": args.timeout,
                         "bundles": {k: str(v) for k, v in bundles.items()},
                         "work_dir": str(work), "argv": sys.argv},
              "systems": {n: asdict(SYSTEMS[n]) for n in system_names}, "cases": {}}
    t_bench = time.perf_counter()  # --budget counts from here: the prime is part of the benchmark's time
    if gpu_source is not None and not args.no_prime:
        result["prime"] = prime(args, work)
    if result["machine"]["loadavg_at_start"][0] > 0.5:
        log.warning("load average %.2f at start: other work is running, timings will be noisy",
                    result["machine"]["loadavg_at_start"][0])
    md_path, json_path = args.out / f"{stamp}.md", args.out / f"{stamp}.json"
    csv_path = args.out / f"{stamp}.csv"
    names = label_names(args.model_dir)

    def save():
        gpu_report.write_json(result, json_path)
        gpu_report.write_csv(result, csv_path)
        with atomic_path(md_path) as tmp:
            tmp.write_text(markdown(result))

    def summarise_case(c):
        for name in system_names:
            c["systems"][name]["summary"] = summarise(c["systems"][name]["runs"])

    n_reps = max(repeats.values())
    total = len(case_names) * sum(repeats[n] + int(args.warmup) for n in system_names)
    k = 0
    agreed: set[str] = set()
    signal.signal(signal.SIGTERM, _interrupt)  # a timeout around the benchmark still gets the results written
    try:
        for case in case_names:
            image = CASES[case].locate(args.cache)
            c = result["cases"][case] = {"description": CASES[case].description, "info": image_info(image),
                                         "systems": {n: {"runs": [], "output": str(work / case / f"{n}.nii.gz")}
                                                     for n in system_names}}
            reps = (["warmup"] if args.warmup else []) + [f"r{i + 1}" for i in range(n_reps)]
            for rep, name in run_order(reps, system_names, args.order):
                if rep != "warmup" and int(rep[1:]) > repeats[name]:
                    continue
                k += 1
                log.info("[%d/%d] %s %s %s ...", k, total, case, name, rep)
                skip = over_budget(args, t_bench, c["systems"][name]["runs"])
                if skip:
                    run = {"rep": rep, "ok": False, "returncode": None, "timed_out": False, "skipped": True,
                           "stderr_tail": skip}
                elif bundle_errors.get(SYSTEMS[name].precision) and SYSTEMS[name].kind == "flare":
                    run = {"rep": rep, "ok": False, "returncode": None, "timed_out": False,
                           "stderr_tail": bundle_errors[SYSTEMS[name].precision]}
                else:
                    run = run_once(SYSTEMS[name], case, image, rep, work, bundles[SYSTEMS[name].precision], args,
                                   gpu_source, timeout_s=min(args.timeout, budget_left(args, t_bench)))
                if run["ok"]:
                    mem = gpu_memory.summary(run.get("gpu_memory"))["max_mib"]
                    log.info("[%d/%d] %s %s %s (%s start): %.1f s, peak RSS %.2f GB%s", k, total, case, name,
                             rep, run["start"], run["wall_s"], run["peak_rss_gb"],
                             f", GPU {mem:.0f} MiB" if mem is not None else "")
                else:
                    log.error("[%d/%d] %s %s %s FAILED (rc=%s)%s\n%s", k, total, case, name, rep,
                              run["returncode"], " timeout" if run["timed_out"] else "", run["stderr_tail"])
                if rep == "warmup":
                    c["systems"][name]["warmup"] = {x: run.get(x) for x in ("ok", "wall_s", "peak_rss_gb")}
                else:
                    c["systems"][name]["runs"].append(run)
                    summarise_case(c)
                    save()  # after every run: a benchmark cut short keeps what it measured
            summarise_case(c)
            add_agreement(c, names)
            agreed.add(case)
            save()
    except KeyboardInterrupt:
        log.error("interrupted: writing what was measured")
        for case, c in result["cases"].items():
            if case in agreed:
                continue
            summarise_case(c)
            try:
                add_agreement(c, names)
            except (OSError, ValueError) as exc:  # a label file cut off mid-write
                log.error("agreement of %s not computed: %s", c["description"], exc)
        result["interrupted"] = True
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    result["bench_wall_s"] = time.perf_counter() - t_bench
    save()
    sys.stdout.write(markdown(result) + "\n")
    log.info("wrote %s and %s (outputs and logs in %s)", md_path, json_path, work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
