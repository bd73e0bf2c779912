"""A small bench/run.py result of a GPU run, written by hand: two systems on one case, a cold and a warm run
each, with GPU memory traces and stage times (numbers chosen so that every reported value is known)."""
from __future__ import annotations


def trace(idle: float, samples: list[float]) -> dict:
    return {"device": "NVIDIA H200", "interval_s": 0.1, "idle_mib": idle, "t_s": [0.1 * i for i in range(len(samples))],
            "samples_mib": samples, "max_mib": max(samples), "max_minus_idle_mib": max(samples) - idle,
            "auc_mib_s": sum(samples) * 0.1, "n_samples": len(samples)}


def run(rep: str, start: str, wall: float, stages: dict, mem: dict | None, backend: str, tiles: int = 75) -> dict:
    return {"rep": rep, "start": start, "ok": True, "returncode": 0, "timed_out": False, "wall_s": wall,
            "device": "NVIDIA H200", "backend": backend, "peak_rss_gb": 2.0, "cpu_s": wall * 0.9,
            "report": {"tiles": tiles, "backend": backend}, "stage_times": stages, "gpu_memory": mem,
            "stderr_tail": ""}


def make_result(bundle: str = "/nonexistent/bundle.onnx") -> dict:
    fast_b, nn_b = "torch 2.11 cuda fp16, CUDA graphs", "torch 2.11 cuda (NVIDIA H200), perform_everything_on_device"
    fast_cold = run("r1", "cold", 9.0, {"startup": 2.0, "read": 1.0, "upload": 0.05, "preprocess": 2.5,
                                        "network": 1.0, "blend+resample": 0.5, "write": 1.0, "model_load": 0.95},
                    trace(512, [512, 900, 1300, 1100, 700]), fast_b)
    fast_warm = run("r2", "warm", 5.0, {"startup": 1.5, "read": 1.0, "upload": 0.05, "preprocess": 0.3,
                                        "network": 0.6, "blend+resample": 0.2, "write": 1.0, "model_load": 0.35},
                    trace(510, [510, 1000, 1200, 600]), fast_b)
    nn = run("r1", "cold", 60.0, {"startup": 5.0, "model_load": 2.0, "read": 1.5, "preprocess": 8.0, "network": 1.5,
                                  "window_other": 2.0, "export": 39.0, "write": 1.0},
             trace(512, [512, 3000, 4000, 3500]), nn_b)
    systems = {
        "cuda_torch_fast": {"runs": [fast_cold, fast_warm], "output": "/x/fast.nii.gz", "summary": {
            "ok": True, "device": "NVIDIA H200", "backend": fast_b, "tiles": 75, "time_ratio": 12.0,
            "cold": {"n": 1, "wall_s": {"median": 9.0, "min": 9.0, "max": 9.0, "n": 1},
                     "gpu_max_mib": {"median": 1300.0, "min": 1300.0, "max": 1300.0, "n": 1},
                     "gpu_max_minus_idle_mib": {"median": 788.0, "min": 788.0, "max": 788.0, "n": 1},
                     "gpu_auc_mib_s": {"median": 451.2, "min": 451.2, "max": 451.2, "n": 1},
                     "stage_times_median_s": fast_cold["stage_times"]},
            "warm": {"n": 1, "wall_s": {"median": 5.0, "min": 5.0, "max": 5.0, "n": 1},
                     "gpu_max_mib": {"median": 1200.0, "min": 1200.0, "max": 1200.0, "n": 1},
                     "gpu_max_minus_idle_mib": {"median": 690.0, "min": 690.0, "max": 690.0, "n": 1},
                     "gpu_auc_mib_s": {"median": 331.0, "min": 331.0, "max": 331.0, "n": 1},
                     "stage_times_median_s": fast_warm["stage_times"]},
            "vs_nnunet": {"dice": {"liver": 0.995}, "min_dice": 0.995, "min_dice_class": "liver",
                          "voxel_agreement": 0.99991, "min_voxels": 1000, "reference": "cuda_nnunet"},
            "vs_cpu": {"dice": {"liver": 0.97, "spleen": 0.99}, "min_dice": 0.97, "min_dice_class": "liver",
                       "voxel_agreement": 0.9995, "min_voxels": 1000, "reference": "fast"}}},
        "cuda_nnunet": {"runs": [nn], "output": "/x/nn.nii.gz", "summary": {
            "ok": True, "device": "NVIDIA H200", "backend": nn_b, "tiles": 75, "time_ratio": 1.0,
            "cold": {"n": 1, "wall_s": {"median": 60.0, "min": 60.0, "max": 60.0, "n": 1},
                     "gpu_max_mib": {"median": 4000.0, "min": 4000.0, "max": 4000.0, "n": 1},
                     "gpu_max_minus_idle_mib": {"median": 3488.0, "min": 3488.0, "max": 3488.0, "n": 1},
                     "gpu_auc_mib_s": {"median": 1101.2, "min": 1101.2, "max": 1101.2, "n": 1},
                     "stage_times_median_s": nn["stage_times"]}}},
        "cuda_torch_faithful": {"runs": [{"rep": "r1", "start": "cold", "ok": False, "returncode": 1,
                                          "timed_out": False, "stderr_tail": "flare-rt: boom"}],
                                "output": "/x/faithful.nii.gz",
                                "summary": {"ok": False, "runs_ok": 0, "runs": 1, "error": "rc=1",
                                            "stderr_tail": "flare-rt: boom"}},
    }
    return {"timestamp": "20261130-120000",
            "machine": {"cpu_model": "Test CPU", "usable_cores": 16, "ram_gb": 128, "python": "3.12.3",
                        "versions": {"torch": "2.11.0", "cupy-cuda13x": "14.2.0", "nnunetv2": "2.8.1",
                                     "onnxruntime": "1.30.0", "flare-rt": "0.1.0"},
                        "git_commit": "abc1234", "flare_rt_dirty": False,
                        "gpu": {"name": "NVIDIA H200", "index": 0, "total_mib": 143771, "driver": "580.159"}},
            "config": {"cases": ["ts269"], "systems": list(systems), "threads": 8, "model_dir": "/m/ts_demo_small_nnunet",
                       "fold": "0", "bundle": bundle, "repeats_per_system": {"cuda_torch_fast": 2, "cuda_nnunet": 1,
                                                                            "cuda_torch_faithful": 1}},
            "systems": {n: {"kind": "nnunet" if n == "cuda_nnunet" else "flare", "device": "cuda"} for n in systems},
            "cases": {"ts269": {"description": "ts_example_ct resampled to 512×512×269",
                                "info": {"path": "/c/ts269_ct.nii.gz", "size_xyz": [512, 512, 269],
                                         "spacing_xyz": [0.78125, 0.78125, 1.25]},
                                "systems": systems}}}
