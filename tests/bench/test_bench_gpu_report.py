"""Files and tables of a GPU benchmark result: JSON, CSV, the Markdown report, the memory PNG, the estimate."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from bench_synthetic import make_result

import estimate
import gpu_report
import plot_memory
from flare_rt.bundle import read_meta
from flare_rt.resources import packaged_model


def test_json_round_trip(tmp_path):
    result = make_result()
    path = gpu_report.write_json(result, tmp_path / "r.json")
    assert json.loads(path.read_text()) == json.loads(json.dumps(result))


def test_csv_has_one_row_per_run_with_memory_and_stage_columns(tmp_path):
    path = gpu_report.write_csv(make_result(), tmp_path / "r.csv")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
        header = rows[0].keys() if rows else []
    assert [(r["system"], r["rep"], r["start"]) for r in rows] == [
        ("cuda_torch_fast", "r1", "cold"), ("cuda_torch_fast", "r2", "warm"), ("cuda_nnunet", "r1", "cold"),
        ("cuda_torch_faithful", "r1", "cold")]
    fast_cold, fast_warm, nn, failed = rows
    assert fast_cold["device"] == "NVIDIA H200" and fast_cold["backend"].startswith("torch 2.11 cuda")
    # recomputed from the samples: max 1300, idle 512, AUC (512+900+1300+1100+700)*0.1
    assert float(fast_cold["gpu_max_mib"]) == 1300 and float(fast_cold["gpu_max_minus_idle_mib"]) == 788
    assert float(fast_cold["gpu_auc_mib_s"]) == pytest.approx(451.2)
    assert fast_warm["gpu_samples"] == "4" and float(fast_warm["wall_s"]) == 5.0
    # stage columns: the union, in first-appearance order; a run without a stage leaves it empty
    stage_cols = [c for c in header if c.startswith("stage_")]
    assert stage_cols == ["stage_startup", "stage_read", "stage_upload", "stage_preprocess", "stage_network",
                          "stage_blend+resample", "stage_write", "stage_model_load", "stage_window_other",
                          "stage_export"]
    assert float(fast_cold["stage_upload"]) == 0.05 and nn["stage_upload"] == "" and nn["stage_export"] == "39"
    assert failed["ok"] == "False" and failed["wall_s"] == "" and failed["returncode"] == "1"


def _table(md: str, case: str) -> list[list[str]]:
    lines = md.split(f"## {case}:", 1)[1].splitlines()
    rows = [ln for ln in lines if ln.startswith("| ")]
    cells = [[c.strip() for c in r.strip("|").split(" | ")] for r in rows]
    return cells


def test_markdown_table_cells():
    md = gpu_report.markdown(make_result())
    header, *rows = _table(md, "ts269")[:4]
    assert header[:10] == ["system", "device", "backend", "cold s", "warm s", "× nnU-Net", "GPU peak MiB",
                           "peak − idle MiB", "AUC MiB·s", "tiles"]
    assert header[10:] == ["startup s", "read s", "upload s", "preprocess s", "network s", "blend+resample s",
                           "write s", "model_load s", "window_other s", "export s"]
    fast = dict(zip(header, rows[0]))
    assert fast["system"] == "cuda_torch_fast" and fast["device"] == "NVIDIA H200"
    assert fast["backend"] == "torch 2.11 cuda fp16"  # first part of the backend's description
    assert (fast["cold s"], fast["warm s"], fast["× nnU-Net"]) == ("9.00", "5.00", "12.00×")
    # memory and stages of the warm run (the typical one)
    assert (fast["GPU peak MiB"], fast["peak − idle MiB"], fast["AUC MiB·s"]) == ("1200", "690", "331")
    assert (fast["preprocess s"], fast["network s"], fast["export s"]) == ("0.30", "0.60", "—")
    nn = dict(zip(header, rows[1]))
    assert (nn["cold s"], nn["warm s"], nn["× nnU-Net"], nn["GPU peak MiB"]) == ("60.00", "—", "reference", "4000")
    assert rows[2][:4] == ["cuda_torch_faithful", "—", "—", "FAILED rc=1"] and len(rows[2]) == len(header)


def test_markdown_agreement_goals_and_failures():
    md = gpu_report.markdown(make_result())
    assert ("- cuda_torch_fast vs fast (the CPU fast path): min Dice 0.9700 (liver) over classes ≥ 1000 voxels, "
            "voxel agreement 0.99950 — goal ≥ 0.98: **NOT met**") in md
    # the 0.99 bar applies to faithful vs nnU-Net; fast vs nnU-Net is reported without a verdict
    assert "- cuda_torch_fast vs cuda_nnunet (nnU-Net's predictor): min Dice 0.9950 (liver)" in md
    assert "- cuda_torch_fast: end to end 12.00× faster than nnU-Net on the same card (goal ≥ 5×): **reached**" in md
    assert "whole-device peak 1200 MiB incl. the CUDA context (goal < 1.5 GB = 1431 MiB): **reached**" in md
    assert "cuda_torch_faithful r1 failed:" in md and "flare-rt: boom" in md
    assert "reran its whole sliding window" not in md

    result = make_result()
    nn_run = result["cases"]["ts269"]["systems"]["cuda_nnunet"]["runs"][0]
    nn_run["report"] = {**(nn_run.get("report") or {}), "fell_back_to_cpu_results": True}
    assert ("cuda_nnunet r1: nnU-Net hit a RuntimeError on the device and reran its whole sliding window"
            in gpu_report.markdown(result))


def test_markdown_table_rejects_ragged_rows():
    with pytest.raises(ValueError, match="2 cells, header 3"):
        gpu_report.md_table(["a", "b", "c"], [["1", "2"]])
    assert gpu_report.md_table(["a|b"], [["x"]])[0] == "| a\\|b |"


def test_xp_lines():
    xp = {"case": "ts269", "comparisons": {"normalised (float32)": {"max_abs": 1.2e-7, "mean_abs": 3e-9,
                                                                   "range": [-7.7, 0.7], "shape": [1, 84, 333, 333]}}}
    lines = gpu_report.xp_lines(xp)
    assert lines[1] == "  - normalised (float32): max |Δ| 1.2e-07 (mean |Δ| 3e-09, value range -7.7…0.7, shape 1×84×333×333)"
    assert gpu_report.xp_lines({"error": "CuPy is not installed"}) == [
        "- CuPy vs numpy preprocessing: not measured (CuPy is not installed)"]


def test_memory_png_from_json(tmp_path):
    import matplotlib.image as mpimg

    src = gpu_report.write_json(make_result(), tmp_path / "r.json")
    assert plot_memory.main([str(src), str(tmp_path / "m.png")]) == 0
    img = mpimg.imread(tmp_path / "m.png")
    assert img.shape[0] > 300 and img.shape[1] > 800
    assert np.ptp(img[..., :3]) > 0.5  # something was drawn
    got = plot_memory.traces(make_result())["ts269"]
    assert [(n, s) for n, s, _ in got] == [("cuda_torch_fast", "cold"), ("cuda_torch_fast", "warm"),
                                         ("cuda_nnunet", "cold")]


def test_memory_png_without_traces_is_a_clear_error(tmp_path, capsys):
    result = make_result()
    for entry in result["cases"]["ts269"]["systems"].values():
        for r in entry["runs"]:
            r["gpu_memory"] = None
    src = gpu_report.write_json(result, tmp_path / "r.json")
    assert plot_memory.main([str(src), str(tmp_path / "m.png")]) == 2
    assert "no run in this result has a GPU memory trace" in capsys.readouterr().err
    assert not (tmp_path / "m.png").exists()


def test_unet_flops_match_torchs_counter():
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from flare_rt.nets import build_network

    meta = read_meta(packaged_model())
    net = build_network(meta.architecture)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(torch.zeros(1, 1, *meta.patch_size))
    cost = estimate.unet_cost(meta.architecture, meta.patch_size)
    assert cost.conv_flops == counter.get_total_flops()  # every convolution counted exactly
    assert estimate.unet_cost(meta.architecture, meta.patch_size, batch=2).conv_flops == 2 * cost.conv_flops


def test_stage_scaling_by_resource():
    h200, rtx = estimate.CARDS["H200"], estimate.TARGET
    est = {e.stage: e for e in estimate.stage_estimates(
        {"startup": 1.0, "network": 0.5, "upload": 0.01, "preprocess": 0.2, "new_stage": 0.1}, h200)}
    assert est["startup"].factor == 1.0
    assert est["network"].factor == pytest.approx(max(989 / 89.2, 4800 / 448))
    assert est["upload"].factor == pytest.approx(50 / 12)
    assert est["preprocess"].factor == pytest.approx(4800 / 448)
    assert "unknown stage" in est["new_stage"].note and est["new_stage"].factor == est["preprocess"].factor
    f64 = estimate.stage_estimates({"preprocess": 1.0}, h200, rtx, fp64=True)[0]
    assert "×97 if fp64-bound" in f64.note
    assert estimate.card_for("NVIDIA H200") is h200 and estimate.card_for("Some GPU") is None


def test_estimate_report_from_result():
    meta = read_meta(packaged_model())
    lines = estimate.report_lines(make_result(), meta)
    text = "\n".join(lines)
    assert "ESTIMATE for the Quadro RTX 5000" in lines[0] and "not a measurement" in lines[0]
    assert "Network: 60.4 GFLOP per 32×128×192 tile" in text
    assert "### ts269 / cuda_torch_fast (measured on NVIDIA H200, warm medians)" in text
    # warm stages: network 0.6 s × 11.09 = 6.65 s is the largest estimated stage
    rows = [ln for ln in lines if ln.startswith("| network |")]
    assert rows and "| 6.65 |" in rows[0]
    assert "Dominant stages (estimate): network" in text
    assert "Network floor on the target: 75 tiles × 60.4 GFLOP at peak = 0.05 s" in text
    assert "### ts269 / cuda_nnunet" not in text  # only flare-rt systems are scaled
