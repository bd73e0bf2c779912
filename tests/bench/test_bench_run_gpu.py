"""bench/run.py's GPU benchmark end to end on the CPU: the GPU systems' commands run with --device cpu and
NVML is a scripted source, everything else (processes, cold/warm cache folders, memory sampling around
each run, summaries, agreement references, JSON/CSV/Markdown, the PNG) is the real thing."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest

import cases
import gpu_memory
import plot_memory
import run
import xp_agreement


class CyclingSource(gpu_memory.SeriesSource):
    """A device whose used memory cycles through a saw-tooth (every run sees a rise and a fall)."""

    def used_mib(self) -> float:
        v = 500.0 + 100.0 * (self.reads % 10)
        self.reads += 1
        return v


@pytest.fixture
def fake_gpu(monkeypatch, tiny_ct):
    source = CyclingSource([0], name="Fake GPU")
    monkeypatch.setattr(run, "open_gpu", lambda index: (source, source.describe()))
    real = run.command
    monkeypatch.setattr(run, "command", lambda *a, **k: ["cpu" if c == "cuda" else c for c in real(*a, **k)])
    monkeypatch.setitem(run.CASES, "tiny", cases.Case("tiny", "crop of the example CT", lambda cache: tiny_ct))
    return source


@pytest.mark.slow
def test_gpu_benchmark_flow(tmp_path, fake_gpu, fp32_bundle, demo_nnunet_dir):
    out = tmp_path / "out"
    rc = run.main(["--cases", "tiny", "--systems", "cuda_torch_fast,cuda_nnunet,cuda_torch_faithful,fast",
                   "--repeats", "2", "--repeats-for", "cuda_nnunet=1", "--repeats-for", "cuda_torch_faithful=1",
                   "--repeats-for", "fast=1", "--no-prime", "--bundle", str(fp32_bundle), "--model-dir",
                   str(demo_nnunet_dir), "--out", str(out), "--timeout", "600"])
    assert rc == 0
    [json_path] = out.glob("*.json")
    result = json.loads(json_path.read_text())
    assert result["machine"]["gpu"]["name"] == "Fake GPU"
    systems = result["cases"]["tiny"]["systems"]
    for name, entry in systems.items():
        assert entry["summary"]["ok"], (name, entry["runs"][-1]["stderr_tail"])

    fast = systems["cuda_torch_fast"]
    assert [r["start"] for r in fast["runs"]] == ["cold", "warm"]
    assert all(r["device"] == "Fake GPU" and "torch" in r["backend"] for r in fast["runs"])
    caches = {r["env_set"]["FLARE_RT_CACHE"] for r in fast["runs"]}
    assert len(caches) == 1 and caches.pop().endswith("tiny/cache/cuda_torch_fast")
    assert fast["runs"][0]["env_set"]["CUPY_CACHE_DIR"].endswith("cuda_torch_fast/cupy")
    assert systems["fast"]["runs"][0]["device"].startswith("CPU: ")
    for r in fast["runs"]:  # memory sampled around every run, the idle reading before it
        mem = r["gpu_memory"]
        assert mem["n_samples"] >= 10 and mem["device"] == "Fake GPU"
        assert set(mem["samples_mib"]) <= {500.0 + 100 * k for k in range(10)}
        assert mem["auc_mib_s"] == pytest.approx(0.1 * sum(mem["samples_mib"]), abs=0.05)
        st = r["stage_times"]  # the report's keys passed through, startup = the rest of the wall time
        assert {"startup", "read", "network", "write", "model_load"} <= set(st)
        assert sum(st.values()) == pytest.approx(r["wall_s"])
    s = fast["summary"]
    assert s["cold"]["n"] == 1 and s["warm"]["n"] == 1 and s["device"] == "Fake GPU"
    assert s["time_ratio"] == pytest.approx(systems["cuda_nnunet"]["summary"]["cold"]["wall_s"]["median"]
                                            / s["warm"]["wall_s"]["median"])
    assert s["vs_nnunet"]["reference"] == "cuda_nnunet"
    assert s["vs_faithful"]["reference"] == "cuda_torch_faithful"
    assert s["vs_cpu"]["reference"] == "fast"
    # the same weights and float32 on the CPU: fast mode agrees with the CPU fast path on every voxel but a few
    assert s["vs_cpu"]["voxel_agreement"] > 0.999
    faithful = systems["cuda_torch_faithful"]["summary"]
    assert faithful["vs_nnunet"]["reference"] == "cuda_nnunet" and "vs_cpu" not in faithful
    assert systems["cuda_nnunet"]["summary"]["time_ratio"] == 1.0
    nn_report = systems["cuda_nnunet"]["runs"][0]["report"]
    assert nn_report["device"] == "cpu"  # the fake: --device swapped
    assert nn_report["window_results_on_device"] == [False] and nn_report["fell_back_to_cpu_results"] is False
    assert nn_report["nnunetv2"].count(".") >= 1  # its installed version
    # network-resolution labels only where they are compared (CPU systems beside fast_ort): none here
    assert not list((out / result["timestamp"] / "tiny").glob("*.net.npz"))

    [csv_path] = out.glob("*.csv")
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["system"], r["start"]) for r in rows] == [
        ("cuda_torch_fast", "cold"), ("cuda_torch_fast", "warm"), ("cuda_nnunet", "cold"),
        ("cuda_torch_faithful", "cold"), ("fast", "cold")]
    assert all(r["gpu_max_mib"] for r in rows) and rows[0]["stage_network"]

    md = next(out.glob("*.md")).read_text()
    assert md.startswith("# flare-rt GPU benchmark") and "## tiny:" in md
    assert "- cuda_torch_faithful vs cuda_nnunet (nnU-Net's predictor): min Dice" in md
    assert plot_memory.main([str(json_path), str(tmp_path / "m.png")]) == 0
    assert (tmp_path / "m.png").stat().st_size > 10_000


def test_budget_skips_what_cannot_fit(tmp_path, fake_gpu, fp32_bundle, demo_nnunet_dir):
    out = tmp_path / "out"
    assert run.main(["--cases", "tiny", "--systems", "cuda_torch_fast", "--repeats", "3", "--no-prime", "--budget",
                     "1", "--bundle", str(fp32_bundle), "--model-dir", str(demo_nnunet_dir), "--out", str(out)]) == 0
    result = json.loads(next(out.glob("*.json")).read_text())
    runs = result["cases"]["tiny"]["systems"]["cuda_torch_fast"]["runs"]
    assert len(runs) == 3 and all(r.get("skipped") for r in runs)
    assert "of the --budget left" in runs[0]["stderr_tail"]


def test_run_order():
    reps = ["warmup", "r1", "r2"]
    assert run.run_order(reps, ["a", "b"], "interleaved") == [
        ("warmup", "a"), ("warmup", "b"), ("r1", "a"), ("r1", "b"), ("r2", "a"), ("r2", "b")]
    assert run.run_order(reps, ["a", "b"], "system") == [
        ("warmup", "a"), ("warmup", "b"), ("r1", "a"), ("r2", "a"), ("r1", "b"), ("r2", "b")]
    assert run.run_order(["r1"], ["a", "b"], "system") == [("r1", "a"), ("r1", "b")]


def test_budget_keeps_a_reserve_for_the_agreements():
    import time
    from types import SimpleNamespace

    args = SimpleNamespace(budget=100.0, system_names=["a", "b", "c"], case_names=["x", "y"])
    left = run.budget_left(args, time.perf_counter())
    assert 100 - 6 * run.AGREEMENT_RESERVE_S - 1 < left <= 100 - 6 * run.AGREEMENT_RESERVE_S
    assert run.budget_left(SimpleNamespace(budget=None), time.perf_counter()) == float("inf")


def test_bad_repeats_for_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        run.main(["--systems", "fast", "--repeats-for", "nnunet=2"])
    assert "--repeats-for 'nnunet=2'" in capsys.readouterr().err


def test_preprocessing_bounds_with_numpy_on_both_sides(example_ct_path):
    """The comparison itself (CuPy is compared on the GPU check): numpy against numpy must be exact."""
    from flare_rt.bundle import read_meta
    from flare_rt.resources import packaged_model
    from measure import read_zyx

    image, spacing = read_zyx(example_ct_path)
    out = xp_agreement.compare(image[40:70], spacing, read_meta(packaged_model()), np)
    assert out["network_shape"] == [22, 252, 305]
    comps = out["comparisons"]
    assert len(comps) == 4 and all(c["max_abs"] == 0 for name, c in comps.items() if not name.startswith("context"))
    ctx = comps["context: CPU float64 vs GPU float32 interpolation"]
    # scipy.ndimage interpolates in float64 whatever the input dtype: on the CPU both settings agree
    assert ctx["max_abs"] == 0 and ctx["shape"] == [1, 22, 252, 305]
    n = read_meta(packaged_model()).normalization  # normalised CT spans the clip window, (HU - mean) / std
    assert ctx["range"] == pytest.approx([(n.lower - n.mean) / n.std, (n.upper - n.mean) / n.std], abs=1e-5)
