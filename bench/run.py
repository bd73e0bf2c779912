"""CPU benchmark of flare-rt against nnU-Net v2's own predictor, measured in the same run.

Every system runs as its own subprocess (so peak memory is isolated) on the same input; wall time
covers the whole process (interpreter start, imports, model load, I/O), as the FLARE clock does.
Agreement (Dice, voxel agreement) is computed from the label files the systems write.

    python bench/run.py                                   # ircad01 + ts269, all systems, 3 repeats (~30+ min)
    python bench/run.py --cases small --repeats 1 --systems nnunet,faithful,fast   # quick check (~2 min)

See bench/README.md for the columns.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
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

from flare_rt.resources import shared_models_dir  # noqa: E402
from cases import CASES, DEFAULT_CASES, image_info  # noqa: E402
from measure import agreement, labels_digest, machine_info, read_labels, run_monitored  # noqa: E402

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
           "fast on OpenVINO, bf16 bundle (bf16 arithmetic)", "bf16"),
    System("fast_ov_int8", "flare", ("--mode", "fast", "--backend", "openvino"),
           "fast on OpenVINO, int8 bundle (calibrated on the DICOM patient)", "int8"),
    System("fast_ort_int8", "flare", ("--mode", "fast", "--backend", "onnxruntime"),
           "fast on ONNX Runtime, int8 bundle", "int8"),
    System("fast_ov_fp32_b2", "flare", ("--mode", "fast", "--backend", "openvino", "--batch-size", "2"),
           "fast on OpenVINO, fp32, two tiles per call"),
]}
ABLATIONS = ("fast_roi0", "fast_roicrop", "fast_labelup0", "fast_f64", "fast_step0.6", "fast_step0.75")
PRECISIONS = ("fast_ort", "fast_ov_fp32", "fast_ov_bf16", "fast_ov_int8")
DEFAULT_SYSTEMS = ("nnunet", "faithful", "fast", *ABLATIONS)
GROUPS = {"default": DEFAULT_SYSTEMS, "ablations": ABLATIONS, "precisions": PRECISIONS, "all": tuple(SYSTEMS)}
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
def command(system: System, image: Path, out: Path, report: Path, bundle: Path, args) -> list[str]:
    if system.kind == "nnunet":
        return [sys.executable, str(BENCH / "nnunet_peer.py"), str(image), str(out), "--model-dir",
                str(args.model_dir), "--fold", args.fold, "--threads", str(args.threads), "--report", str(report),
                *system.args]
    return [sys.executable, "-m", "flare_rt", "segment", str(image), str(out), "--model", str(bundle),
            "--threads", str(args.threads), "--report", str(report), "--overwrite",
            "--save-network-labels", str(network_labels_path(out)), *system.args]


def network_labels_path(out: Path) -> Path:
    """Where a flare-rt run saves its network-resolution argmax (beside its label file)."""
    return out.with_name(out.name.replace(".nii.gz", ".net.npz"))


def environment(system: System, threads: int) -> tuple[dict, dict]:
    """Environment of a run and the variables set on top of ours (recorded in the JSON)."""
    extra = {"PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
             "PYTHONUNBUFFERED": "1"}
    if system.kind == "nnunet":
        extra["nnUNet_def_n_proc"] = str(threads)  # nnU-Net's own torch-thread cap for window and export
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


def run_once(system: System, case: str, image: Path, rep: str, work: Path, bundle: Path, args) -> dict:
    d = work / case
    d.mkdir(parents=True, exist_ok=True)
    out = d / f"{system.name}.nii.gz"
    report_path = d / f"{system.name}.{rep}.json"
    report_path.unlink(missing_ok=True)
    env, extra_env = environment(system, args.threads)
    cmd = command(system, image, out, report_path, bundle, args)
    load = os.getloadavg()[0]
    res = run_monitored(cmd, d / f"{system.name}.{rep}", env=env, cwd=REPO, timeout_s=args.timeout)
    report = None
    if res.ok:
        try:
            report = json.loads(report_path.read_text())
        except (OSError, ValueError) as exc:
            res.stderr_tail = f"exit 0 but no readable --report {report_path}: {exc}"
    ok = res.ok and report is not None and out.is_file()
    if res.ok and not out.is_file():
        res.stderr_tail = f"exit 0 but no output {out}"
    run = {"rep": rep, "ok": ok, "returncode": res.returncode, "timed_out": res.timed_out, "wall_s": res.wall_s,
           "peak_rss_gb": res.peak_rss_bytes / 1e9, "ru_maxrss_gb": (res.ru_maxrss_bytes or 0) / 1e9,
           "cpu_s": res.cpu_s, "samples": res.n_samples, "max_processes": res.max_processes,
           "loadavg_1min_before": round(load, 2), "cmd": res.cmd, "env_set": extra_env,
           "stderr_tail": res.stderr_tail, "report": report, "stages": stages(system, report, res.wall_s),
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


def summarise(runs: list[dict]) -> dict:
    good = [r for r in runs if r["ok"]]
    s = {"ok": bool(good), "runs_ok": len(good), "runs": len(runs)}
    if not runs:
        s.update(error="not run", stderr_tail="")
        return s
    if not good:
        bad = runs[-1]
        s.update(error=f"rc={bad.get('returncode')}" + (" (timeout)" if bad.get("timed_out") else ""),
                 stderr_tail=bad.get("stderr_tail", ""))
        return s
    s["wall_s"] = _stats([r["wall_s"] for r in good])
    s["peak_rss_gb"] = _stats([r["peak_rss_gb"] for r in good])
    s["cpu_s"] = _stats([r["cpu_s"] for r in good])
    s["stages_median_s"] = {k: (_stats([r["stages"][k] for r in good]) or {}).get("median")
                            for k in good[0]["stages"]}
    rep = good[0]["report"] or {}
    s["tiles"] = rep.get("tiles")
    s["network_shape"] = rep.get("network_shape")
    s["backend"] = rep.get("backend")
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


def add_agreement(case_result: dict, names: dict[int, str]) -> None:
    systems = case_result["systems"]
    ref_name = next((n for n in ("nnunet", "nnunet_files") if systems.get(n, {}).get("summary", {}).get("ok")), None)
    faithful_ok = systems.get("faithful", {}).get("summary", {}).get("ok")
    fp32_ok = systems.get(FP32_REFERENCE, {}).get("summary", {}).get("ok")
    cache: dict[str, object] = {}

    def labels(name):
        if name not in cache:
            cache[name] = read_labels(Path(systems[name]["output"]))
        return cache[name]

    for name, entry in systems.items():
        summ = entry["summary"]
        if not summ.get("ok"):
            continue
        if ref_name and name != ref_name:
            summ["vs_nnunet"] = agreement(labels(ref_name), labels(name), names)
            summ["vs_nnunet"]["reference"] = ref_name
        if faithful_ok and name.startswith("fast"):
            summ["vs_faithful"] = agreement(labels("faithful"), labels(name), names)
        if fp32_ok and name != FP32_REFERENCE and SYSTEMS[name].kind == "flare":
            summ["vs_fp32"] = agreement(labels(FP32_REFERENCE), labels(name), names)
            if "error" not in summ["vs_fp32"]:
                summ["vs_fp32"]["network_agreement"] = network_agreement(
                    Path(systems[FP32_REFERENCE]["output"]), Path(systems[name]["output"]))
    for name, entry in systems.items():  # ratios against nnU-Net
        summ = entry["summary"]
        ref = systems.get(ref_name, {}).get("summary") if ref_name else None
        if summ.get("ok") and ref:
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
             "wall = whole process (start-up, imports, model load, I/O)",
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
                         "--fold", args.fold, "--precision", "fp32"], args.cache / "import-nnunet",
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
           "--threads", str(threads)]
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
    p.add_argument("-v", "--verbose", action="store_true")
    return p


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
    try:
        import psutil  # noqa: F401
    except ImportError:
        parser.error("psutil is needed for the memory sampler: pip install psutil")
    args.cache = args.cache or args.out / "cache"
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    work = args.out / stamp

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
    result = {"timestamp": stamp, "machine": machine_info(REPO),
              "config": {"cases": case_names, "systems": system_names, "repeats": args.repeats,
                         "warmup": args.warmup, "threads": args.threads, "model_dir": str(args.model_dir),
                         "fold": args.fold, "bundle": str(bundle), "timeout_s": args.timeout,
                         "bundles": {k: str(v) for k, v in bundles.items()},
                         "work_dir": str(work), "argv": sys.argv},
              "systems": {n: asdict(SYSTEMS[n]) for n in system_names}, "cases": {}}
    if result["machine"]["loadavg_at_start"][0] > 0.5:
        log.warning("load average %.2f at start: other work is running, timings will be noisy",
                    result["machine"]["loadavg_at_start"][0])
    md_path, json_path = args.out / f"{stamp}.md", args.out / f"{stamp}.json"
    names = label_names(args.model_dir)

    def save():
        json_path.write_text(json.dumps(result, indent=1, default=str))
        md_path.write_text(markdown(result))

    total = len(case_names) * len(system_names) * (args.repeats + int(args.warmup))
    k = 0
    t_bench = time.perf_counter()
    try:
        for case in case_names:
            image = CASES[case].locate(args.cache)
            c = result["cases"][case] = {"description": CASES[case].description, "info": image_info(image),
                                         "systems": {n: {"runs": [], "output": str(work / case / f"{n}.nii.gz")}
                                                     for n in system_names}}
            reps = (["warmup"] if args.warmup else []) + [f"r{i + 1}" for i in range(args.repeats)]
            for rep in reps:  # interleaved: each repeat runs every system, so drift hits all alike
                for name in system_names:
                    k += 1
                    log.info("[%d/%d] %s %s %s ...", k, total, case, name, rep)
                    error = bundle_errors.get(SYSTEMS[name].precision)
                    if error and SYSTEMS[name].kind == "flare":
                        run = {"rep": rep, "ok": False, "returncode": None, "timed_out": False, "stderr_tail": error}
                    else:
                        run = run_once(SYSTEMS[name], case, image, rep, work, bundles[SYSTEMS[name].precision], args)
                    if run["ok"]:
                        log.info("[%d/%d] %s %s %s: %.1f s, peak RSS %.2f GB", k, total, case, name, rep,
                                 run["wall_s"], run["peak_rss_gb"])
                    else:
                        log.error("[%d/%d] %s %s %s FAILED (rc=%s)%s\n%s", k, total, case, name, rep,
                                  run["returncode"], " timeout" if run["timed_out"] else "", run["stderr_tail"])
                    if rep == "warmup":
                        c["systems"][name]["warmup"] = {x: run[x] for x in ("ok", "wall_s", "peak_rss_gb")}
                    else:
                        c["systems"][name]["runs"].append(run)
            for name in system_names:
                c["systems"][name]["summary"] = summarise(c["systems"][name]["runs"])
            add_agreement(c, names)
            save()
    except KeyboardInterrupt:
        log.error("interrupted: writing what was measured")
        for c in result["cases"].values():
            for entry in c["systems"].values():
                entry.setdefault("summary", summarise(entry["runs"]))
        result["interrupted"] = True
    result["bench_wall_s"] = time.perf_counter() - t_bench
    save()
    sys.stdout.write(markdown(result) + "\n")
    log.info("wrote %s and %s (outputs and logs in %s)", md_path, json_path, work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
