"""Results of bench/run.py as files and tables: the JSON, one CSV row per run, and the GPU report (one
table per case: end-to-end time cold and warm, whole-device GPU memory, the stage breakdown, the ratio
to nnU-Net's predictor on the same card; then the agreement lines and the goals).

    python bench/gpu_report.py RESULTS.json                     # print the report of a finished run
    python bench/gpu_report.py RESULTS.json --xp XP.json --estimate --out REPORT.md

Pure functions of the result dictionary; nothing here touches a GPU, so the report of a GPU run can be
re-made on any machine.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from pathlib import Path

from benchpath import BENCH, REPO  # noqa: E402,F401  (sys.path: this checkout)

from flare_rt.atomic import atomic_path  # noqa: E402
import gpu_memory  # noqa: E402

log = logging.getLogger("bench.gpu_report")

#: The issue's goals and agreement thresholds (per-class Dice over classes with >= 1000 voxels).
GOAL_SPEEDUP = 5.0  # end to end, against nnU-Net's predictor on the same card
GOAL_PEAK_MIB = 1.5e9 / 2**20  # "under 1.5 GB" whole-device, CUDA context included: 1430.5 MiB
MIN_DICE = {"vs_nnunet": 0.99, "vs_cpu": 0.98}  # faithful GPU vs nnU-Net GPU; fast GPU vs fast CPU
AGREEMENT_TEXT = {"vs_nnunet": "nnU-Net's predictor", "vs_faithful": "flare-rt faithful (same device, backend)",
                  "vs_cpu": "the CPU fast path"}


# -- files ---------------------------------------------------------------------------------------------------
def write_json(result: dict, path: Path) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(result, indent=1, default=str))
    return path


RUN_COLUMNS = ("case", "system", "rep", "start", "ok", "device", "backend", "wall_s", "gpu_max_mib",
               "gpu_max_minus_idle_mib", "gpu_auc_mib_s", "gpu_idle_mib", "gpu_samples", "peak_rss_gb", "cpu_s",
               "tiles", "returncode", "timed_out", "skipped")


def csv_rows(result: dict) -> tuple[list[str], list[dict]]:
    """One row per run; the stage columns (``stage_<name>``, seconds) are the union over all runs, in
    the order they first appear."""
    rows, stage_keys = [], []
    for case, c in result.get("cases", {}).items():
        for name, entry in c["systems"].items():
            for r in entry.get("runs", []):
                mem = r.get("gpu_memory") or {}
                m = gpu_memory.summary(mem)
                row = {"case": case, "system": name, "rep": r.get("rep"), "start": r.get("start"), "ok": r.get("ok"),
                       "device": r.get("device"), "backend": r.get("backend"), "wall_s": r.get("wall_s"),
                       "gpu_max_mib": m["max_mib"], "gpu_max_minus_idle_mib": m["max_minus_idle_mib"],
                       "gpu_auc_mib_s": m["auc_mib_s"], "gpu_idle_mib": mem.get("idle_mib"),
                       "gpu_samples": len(mem.get("samples_mib", [])) if mem else None,
                       "peak_rss_gb": r.get("peak_rss_gb"), "cpu_s": r.get("cpu_s"),
                       "tiles": (r.get("report") or {}).get("tiles"), "returncode": r.get("returncode"),
                       "timed_out": r.get("timed_out"), "skipped": bool(r.get("skipped"))}
                for k, v in (r.get("stage_times") or {}).items():
                    if k not in stage_keys:
                        stage_keys.append(k)
                    row[f"stage_{k}"] = v
                rows.append(row)
    return [*RUN_COLUMNS, *(f"stage_{k}" for k in stage_keys)], rows


def write_csv(result: dict, path: Path) -> Path:
    columns, rows = csv_rows(result)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, restval="")
        w.writeheader()
        for row in rows:
            w.writerow({k: _csv_value(v) for k, v in row.items()})
    return path


def _csv_value(v):
    if isinstance(v, float):
        return f"{v:.6g}"
    return "" if v is None else v


# -- tables --------------------------------------------------------------------------------------------------
def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table; every row must have the header's number of cells."""
    for r in rows:
        if len(r) != len(header):
            raise ValueError(f"row has {len(r)} cells, header {len(header)}: {r}")
    esc = lambda cell: str(cell).replace("|", "\\|")  # noqa: E731
    return ["| " + " | ".join(map(esc, header)) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(map(esc, r)) + " |" for r in rows)]


def _num(v, fmt: str = "{:.2f}") -> str:
    return "—" if v is None else fmt.format(v)


def _med(stats: dict | None):
    return None if not stats else stats.get("median")


def _typical(summary: dict) -> dict:
    return summary.get("warm") or summary.get("cold") or {}


def stage_keys(case: dict) -> list[str]:
    keys: list[str] = []
    for entry in case["systems"].values():
        for start in ("warm", "cold"):
            for k in (entry.get("summary", {}).get(start) or {}).get("stage_times_median_s", {}):
                if k not in keys:
                    keys.append(k)
    return keys


def case_table(case: dict) -> list[str]:
    """The system table of one case: times, GPU memory, ratio to nnU-Net, and the stage breakdown
    (medians of the warm runs, or of the cold run where there was no warm one)."""
    keys = stage_keys(case)
    header = ["system", "device", "backend", "cold s", "warm s", "× nnU-Net", "GPU peak MiB", "peak − idle MiB",
              "AUC MiB·s", "tiles", *(f"{k} s" for k in keys)]
    rows = []
    for name, entry in case["systems"].items():
        s = entry.get("summary", {})
        if not s.get("ok"):
            why = s.get("error", "not run")
            rows.append([name, "—", "—", f"FAILED {why}", *["—"] * (len(header) - 4)])
            continue
        t, cold = _typical(s), s.get("cold") or {}
        warm = s.get("warm") or {}
        warm_cell = _num(_med(warm.get("wall_s")))
        if warm and warm["wall_s"]["n"] > 1:
            warm_cell += f" ({warm['wall_s']['min']:.2f}–{warm['wall_s']['max']:.2f})"
        ratio = s.get("time_ratio")
        rows.append([name, s.get("device") or "—", _short_backend(s.get("backend")), _num(_med(cold.get("wall_s"))),
                     warm_cell, "reference" if ratio == 1.0 and name.endswith("nnunet") else _num(ratio, "{:.2f}×"),
                     _num(_med(t.get("gpu_max_mib")), "{:.0f}"), _num(_med(t.get("gpu_max_minus_idle_mib")), "{:.0f}"),
                     _num(_med(t.get("gpu_auc_mib_s")), "{:.0f}"), _num(s.get("tiles"), "{}"),
                     *(_num(t.get("stage_times_median_s", {}).get(k)) for k in keys)])
    return md_table(header, rows)


def _short_backend(text: str | None) -> str:
    return "—" if not text else text.split(",")[0]


def agreement_lines(case: dict) -> list[str]:
    """One line per comparison made, with its threshold where the issue sets one."""
    lines = []
    for name, entry in case["systems"].items():
        s = entry.get("summary", {})
        for key in ("vs_nnunet", "vs_faithful", "vs_cpu"):
            a = s.get(key)
            if not a:
                continue
            ref = a.get("reference", "?")
            if "error" in a:
                lines.append(f"- {name} vs {ref}: {a['error']}")
                continue
            bar = MIN_DICE.get(key) if (key != "vs_nnunet" or "faithful" in name) else None
            md = a["min_dice"]
            verdict = ""
            if bar is not None:
                verdict = f" — goal ≥ {bar}: **{'met' if md is not None and md >= bar else 'NOT met'}**"
            worst = "no class ≥ 1000 voxels" if md is None else f"min Dice {md:.4f} ({a['min_dice_class']})"
            lines.append(f"- {name} vs {ref} ({AGREEMENT_TEXT[key]}): {worst} over classes ≥ "
                         f"{a.get('min_voxels', 1000)} voxels, voxel agreement {a['voxel_agreement']:.5f}{verdict}")
    return lines


def goal_lines(case: dict) -> list[str]:
    lines = []
    for name, entry in case["systems"].items():
        s = entry.get("summary", {})
        if not (s.get("ok") and name.startswith("cuda_") and name.endswith("_fast")):
            continue
        ratio, peak = s.get("time_ratio"), _med(_typical(s).get("gpu_max_mib"))
        if ratio is not None:
            lines.append(f"- {name}: end to end {ratio:.2f}× faster than nnU-Net on the same card (goal ≥ "
                         f"{GOAL_SPEEDUP:.0f}×): **{'reached' if ratio >= GOAL_SPEEDUP else 'not reached'}**")
        if peak is not None:
            lines.append(f"- {name}: whole-device peak {peak:.0f} MiB incl. the CUDA context (goal < 1.5 GB = "
                         f"{GOAL_PEAK_MIB:.0f} MiB): **{'reached' if peak < GOAL_PEAK_MIB else 'not reached'}**")
    return lines


def failure_lines(case: dict) -> list[str]:
    out = []
    for name, entry in case["systems"].items():
        s = entry.get("summary", {})
        fell_back = [r.get("rep") for r in entry.get("runs", []) if (r.get("report") or {}).get("fell_back_to_cpu_results")]
        if fell_back:  # its time includes a second sliding window with the results on the CPU
            out += ["", f"{name} {', '.join(fell_back)}: nnU-Net hit a RuntimeError on the device and reran its whole "
                        "sliding window with the results arrays on the CPU (its own fallback); its times include both"]
        tails = [(r.get("rep"), r.get("stderr_tail", "")) for r in entry.get("runs", []) if not r.get("ok")]
        for rep, tail in tails[:1]:
            out += ["", f"{name} {rep} failed{' (ok in other runs)' if s.get('ok') else ''}:", "```",
                    (tail or "").strip()[-3000:], "```"]
    return out


def xp_lines(xp: dict | None) -> list[str]:
    """CuPy-vs-numpy bounds written by bench/xp_agreement.py."""
    if not xp:
        return []
    if "error" in xp:
        return [f"- CuPy vs numpy preprocessing: not measured ({xp['error']})"]
    lines = [f"- CuPy vs numpy on {xp.get('case', '?')} (same functions, `flare_rt.preprocess.ct_normalize` and "
             "`flare_rt.resample.resample`, arrays of each module):"]
    for name, d in xp.get("comparisons", {}).items():
        lines.append(f"  - {name}: max |Δ| {d['max_abs']:.3g} (mean |Δ| {d['mean_abs']:.3g}, value range "
                     f"{d['range'][0]:.3g}…{d['range'][1]:.3g}, shape {'×'.join(map(str, d['shape']))})")
    return lines


def header_lines(result: dict) -> list[str]:
    m, cfg = result["machine"], result["config"]
    v = m.get("versions", {})
    gpu = m.get("gpu")
    gpu_text = (f"{gpu['name']} (NVML index {gpu['index']}, {gpu['total_mib']} MiB, driver {gpu['driver']})"
                if isinstance(gpu, dict) else str(gpu))
    return [f"# flare-rt GPU benchmark — {result['timestamp']}", "",
            f"- GPU: {gpu_text}; CPU: {m.get('cpu_model')}, {m.get('usable_cores')} usable cores, "
            f"{m.get('ram_gb')} GB RAM; threads {cfg.get('threads')} for every system",
            f"- Software: Python {m.get('python')}, torch {v.get('torch')}, CuPy "
            f"{v.get('cupy-cuda13x') or v.get('cupy-cuda12x')}, nnunetv2 {v.get('nnunetv2')}, onnxruntime "
            f"{v.get('onnxruntime')}, flare-rt {v.get('flare-rt')} (git {m.get('git_commit')}"
            f"{', flare_rt/ modified' if m.get('flare_rt_dirty') else ''})",
            f"- Model: {Path(cfg.get('model_dir', '')).name} fold {cfg.get('fold')}, flare-rt bundle "
            f"{Path(str(cfg.get('bundle'))).name}; runs per system {cfg.get('repeats_per_system')}",
            "- Times: whole process, launch to exit (start-up, imports, model load, I/O, teardown). Cold = first "
            "run with empty cache folders (flare-rt's cache: CuPy kernels, later TensorRT engines; Triton, "
            "inductor, CUDA JIT); warm = later runs with them filled. × nnU-Net = nnU-Net's wall / the "
            "system's, warm where there are warm runs, same card.",
            f"- GPU memory: {m.get('gpu_memory_method', gpu_memory.METHOD)}",
            f"- Stage columns: medians of the warm runs (cold where none); flare-rt's report keys as they are, "
            f"startup = wall − reported stages. {'Page cache primed first: ' + str(result['prime']) if result.get('prime') else ''}",
            ""]


def markdown(result: dict, xp: dict | None = None, estimate: list[str] | None = None) -> str:
    lines = header_lines(result)
    if result.get("interrupted"):
        lines += ["**Interrupted: the results below are what was measured before the stop.**", ""]
    for case_name, c in result.get("cases", {}).items():
        info = c.get("info", {})
        lines += [f"## {case_name}: {c.get('description', '')}", "",
                  f"Input {info.get('path')}: {'×'.join(map(str, info.get('size_xyz', [])))} voxels, spacing "
                  f"{'×'.join(map(str, info.get('spacing_xyz', [])))} mm.", ""]
        lines += case_table(c)
        agree = agreement_lines(c)
        goals = goal_lines(c)
        if agree:
            lines += ["", "Agreement (labels of the same run):", *agree]
        if goals:
            lines += ["", "Goals:", *goals]
        lines += failure_lines(c)
        lines.append("")
    if xp:
        lines += ["## Preprocessing on the GPU vs the CPU", "", *xp_lines(xp), ""]
    if estimate:
        lines += estimate + [""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Report of a bench/run.py result JSON (tables, agreement, goals)")
    p.add_argument("results", type=Path)
    p.add_argument("--xp", type=Path, help="CuPy-vs-numpy bounds from bench/xp_agreement.py")
    p.add_argument("--estimate", action="store_true", help="add the RTX 5000 estimate (bench/estimate.py)")
    p.add_argument("--out", type=Path, help="also write the report here (Markdown)")
    p.add_argument("--csv", type=Path, help="also write the per-run CSV here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    result = json.loads(args.results.read_text())
    xp = json.loads(args.xp.read_text()) if args.xp and args.xp.is_file() else (
        {"error": f"{args.xp} not written"} if args.xp else None)
    est = None
    if args.estimate:
        import estimate

        est = estimate.report_lines(result)
    text = markdown(result, xp, est)
    sys.stdout.write(text + "\n")
    if args.out:
        with atomic_path(args.out) as tmp:
            tmp.write_text(text)
    if args.csv:
        write_csv(result, args.csv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
