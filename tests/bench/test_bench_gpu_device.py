"""On a GPU (marker ``gpu``; skipped without one): the NVML sampler sees another process's allocation
and holds no CUDA context itself; CuPy and numpy give the same preprocessing within stated bounds."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from flare_rt.devices import cuda_device_count

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(cuda_device_count() == 0, reason="needs a CUDA GPU (none found by the driver)")]


def test_sampler_sees_other_processes_and_holds_no_context():
    import pynvml

    import gpu_memory

    source = gpu_memory.NvmlSource(0)
    code = ("import time, torch; x = torch.empty(2 * 1024**3, dtype=torch.uint8, device='cuda'); "
            "torch.cuda.synchronize(); time.sleep(1.5)")
    with gpu_memory.GpuMemorySampler(source) as sampler:
        subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
        time.sleep(0.5)  # a few samples after the exit
    trace = sampler.trace
    assert trace.max_minus_idle_mib >= 2048  # the 2 GiB tensor (and that process's CUDA context)
    assert abs(trace.samples_mib[-1] - trace.idle_mib) < 256  # released after the exit
    pids = {p.pid for p in pynvml.nvmlDeviceGetComputeRunningProcesses(source._handle)}
    assert os.getpid() not in pids  # sampling opened no CUDA context here
    source.close()


def test_cupy_preprocessing_matches_numpy(example_ct_path):
    cupy = pytest.importorskip("cupy", reason="CuPy for the GPU pipeline (the GPU machine has it)")
    import xp_agreement
    from flare_rt.bundle import read_meta
    from flare_rt.resources import packaged_model
    from measure import read_zyx

    image, spacing = read_zyx(example_ct_path)
    out = xp_agreement.compare(image, spacing, read_meta(packaged_model()), cupy)
    c = out["comparisons"]
    assert c["normalised (float32)"]["max_abs"] <= 1e-5
    assert c["resampled, float64 interpolation (faithful mode)"]["max_abs"] <= 1e-4
    assert c["resampled, float32 interpolation (fast mode)"]["max_abs"] <= 1e-3
