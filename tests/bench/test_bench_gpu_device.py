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


ALLOCATE_2_GIB = ("import time, torch; x = torch.empty(2 * 1024**3, dtype=torch.uint8, device='cuda'); "
                  "torch.cuda.synchronize(); print('ready', flush=True); time.sleep({seconds})")


def compute_processes(handle) -> list[int]:
    import pynvml

    return [p.pid for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)]


def test_sampler_sees_other_processes():
    import gpu_memory

    source = gpu_memory.NvmlSource(0)
    with gpu_memory.GpuMemorySampler(source) as sampler:
        subprocess.run([sys.executable, "-c", ALLOCATE_2_GIB.format(seconds=1.5)], check=True, timeout=120)
        time.sleep(0.5)  # a few samples after the exit
    trace = sampler.trace
    assert trace.max_minus_idle_mib >= 2048  # the 2 GiB tensor (and that process's CUDA context)
    assert abs(trace.samples_mib[-1] - trace.idle_mib) < 256  # released after the exit
    source.close()


#: Run in a fresh process (this test process may hold CUDA contexts of earlier GPU tests): sample while a
#: child holds 2 GiB, then count the processes NVML lists. Printed: own pid listed?, child pid, count.
SAMPLING_PROCESS = """
import json, os, subprocess, sys, time
import gpu_memory, pynvml
source = gpu_memory.NvmlSource(0)
with gpu_memory.GpuMemorySampler(source) as sampler:
    child = subprocess.Popen([sys.executable, "-c", sys.argv[1]], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "ready"
    time.sleep(0.3)
    pids = [p.pid for p in pynvml.nvmlDeviceGetComputeRunningProcesses(source._handle)]
    child.wait(timeout=120)
print(json.dumps({"self_listed": os.getpid() in pids, "child_listed": child.pid in pids, "count": len(pids),
                  "samples": len(sampler.trace.samples_mib), "modules": sorted(m for m in ("torch", "cupy")
                                                                               if m in sys.modules)}))
"""


def test_sampling_opens_no_cuda_context():
    """NVML lists every process holding a CUDA context on the card; a sampling process adds none. Counted,
    not only matched by pid, since NVML may list host pids inside a container's pid namespace."""
    import json

    import gpu_memory

    source = gpu_memory.NvmlSource(0)
    before = len(compute_processes(source._handle))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(gpu_memory.__file__),
                                                        os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", SAMPLING_PROCESS, ALLOCATE_2_GIB.format(seconds=3)], env=env,
                          capture_output=True, text=True, timeout=180)
    source.close()
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["samples"] >= 3 and got["modules"] == []  # it sampled, and loaded neither CUDA library
    assert not got["self_listed"]
    assert got["count"] == before + 1  # the child alone: the sampler holds no context


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
