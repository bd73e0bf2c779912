"""Measurement helpers of bench/run.py: a monitored subprocess (wall time, peak RSS of the whole
process tree), label-map agreement, and a description of the machine and software."""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np

from flare_rt.devices import cpu_name

log = logging.getLogger("bench.measure")

SAMPLE_INTERVAL_S = 0.05
SAMPLER_METHOD = (f"psutil: sum of memory_info().rss over the process and all its descendants "
                  f"(children(recursive=True)), polled every {SAMPLE_INTERVAL_S} s; peak = max of the samples. "
                  "Cross-check ru_maxrss_gb: getrusage of the reaped child via wait4 (largest single process "
                  "of the tree, not a sum).")


# -- monitored subprocess ------------------------------------------------------------------------------
@dataclass
class RunResult:
    cmd: list[str]
    returncode: int | None = None
    wall_s: float | None = None
    peak_rss_bytes: int = 0
    ru_maxrss_bytes: int | None = None
    cpu_s: float | None = None  # user + system of the process and its reaped descendants
    n_samples: int = 0
    max_processes: int = 0
    timed_out: bool = False
    stderr_tail: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


def _tree_rss(proc) -> tuple[int, int]:
    """Summed RSS (bytes) and process count of ``proc`` and all its descendants; vanished ones skipped."""
    import psutil

    try:
        procs = [proc] + proc.children(recursive=True)
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return 0, 0
    total = n = 0
    for p in procs:
        try:
            total += p.memory_info().rss
            n += 1
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            pass
    return total, n


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_monitored(cmd: list[str], log_prefix: Path, env: dict | None = None, cwd: str | Path | None = None,
                  timeout_s: float = 3600.0, interval_s: float = SAMPLE_INTERVAL_S, gpu_sampler=None) -> RunResult:
    """Run ``cmd`` in its own session; sample the tree's RSS until it exits; stdout/stderr to files.

    The process is reaped with ``os.wait4`` in a waiter thread, so the wall time ends at the exit
    (not at the next sample) and the kernel's rusage of the whole reaped tree comes back too.
    ``gpu_sampler`` (a :class:`gpu_memory.GpuMemorySampler`) is started before the launch (taking the
    idle reading) and stopped after the exit; its trace goes to ``extra["gpu_memory"]``. An interrupt
    (Ctrl-C, SIGTERM turned into KeyboardInterrupt) kills the process group before it propagates."""
    import psutil

    out_path, err_path = log_prefix.with_suffix(".out"), log_prefix.with_suffix(".err")
    res = RunResult(cmd=[str(c) for c in cmd])
    if gpu_sampler is not None:
        gpu_sampler.start()
    try:
        _run(res, psutil, out_path, err_path, env, cwd, timeout_s, interval_s)
    finally:
        if gpu_sampler is not None:
            res.extra["gpu_memory"] = gpu_sampler.stop().to_json()
    if not res.ok:
        res.stderr_tail = _tail(err_path) or _tail(out_path)
    return res


def _run(res: RunResult, psutil, out_path: Path, err_path: Path, env, cwd, timeout_s: float, interval_s: float):
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(res.cmd, stdout=out, stderr=err, env=env, cwd=cwd, start_new_session=True)
        done = threading.Event()
        waited: dict = {}

        def waiter():
            _, status, usage = os.wait4(proc.pid, 0)
            waited.update(t_end=time.perf_counter(), status=status, usage=usage)
            done.set()

        threading.Thread(target=waiter, daemon=True).start()
        try:
            ps = psutil.Process(proc.pid)
        except psutil.NoSuchProcess:
            ps = None
        try:
            while not done.is_set():
                if ps is not None:
                    rss, n = _tree_rss(ps)
                    res.peak_rss_bytes = max(res.peak_rss_bytes, rss)
                    res.max_processes = max(res.max_processes, n)
                    res.n_samples += 1
                if time.perf_counter() - t0 > timeout_s:
                    res.timed_out = True
                    log.error("timeout after %.0fs: killing process group %d", timeout_s, proc.pid)
                    _kill_group(proc.pid)
                    done.wait(30)
                    break
                done.wait(interval_s)
        except BaseException:
            _kill_group(proc.pid)
            done.wait(30)
            raise
    if "status" in waited:
        res.returncode = os.waitstatus_to_exitcode(waited["status"])
        proc.returncode = res.returncode  # reaped here; keep Popen from waiting again
        res.wall_s = waited["t_end"] - t0
        u = waited["usage"]
        res.ru_maxrss_bytes = u.ru_maxrss * 1024  # Linux: KiB
        res.cpu_s = u.ru_utime + u.ru_stime


# -- agreement between label maps ---------------------------------------------------------------------------
def read_zyx(path: Path, scaled: bool = True) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A 3D NIfTI image as a (z, y, x) array (SimpleITK's order) and its (z, y, x) spacing, read with nibabel
    (no SimpleITK needed). ``scaled=False`` refuses images with intensity scaling (label maps)."""
    import nibabel as nib

    img = nib.load(str(path))
    if len(img.shape) != 3:
        raise ValueError(f"{path}: expected a 3D image, got shape {img.shape}")
    if not scaled and (img.dataobj.slope not in (1, None) or img.dataobj.inter not in (0, None)):
        raise ValueError(f"{path}: label map with intensity scaling (slope {img.dataobj.slope}, "
                         f"intercept {img.dataobj.inter})")
    spacing = tuple(float(s) for s in img.header.get_zooms()[:3][::-1])
    return np.ascontiguousarray(np.asarray(img.dataobj).T), spacing  # type: ignore[return-value]


def read_labels(path: Path) -> np.ndarray:
    """A label map as a (z, y, x) array."""
    return read_zyx(path, scaled=False)[0]


def labels_digest(path: Path) -> str:
    """Digest of the label array (not the file bytes: compression headers may differ)."""
    return hashlib.sha1(np.ascontiguousarray(read_labels(path)).tobytes()).hexdigest()[:16]


def agreement(ref: np.ndarray, test: np.ndarray, names: dict[int, str], min_voxels: int = 1000) -> dict:
    """:func:`flare_rt.agreement.label_agreement`, with a shape mismatch reported as ``{"error": ...}``."""
    from flare_rt.agreement import label_agreement

    try:
        return label_agreement(ref, test, names, min_voxels)
    except ValueError as exc:
        return {"error": str(exc)}


# -- machine and software ------------------------------------------------------------------------------------
def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _git(repo: Path, *args: str) -> str | None:
    try:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def _flare_rt_version(repo: Path) -> str | None:
    """flare-rt runs from the source tree (PYTHONPATH), which may not be the installed distribution."""
    import re

    try:
        m = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", (repo / "flare_rt" / "__init__.py").read_text())
    except OSError:
        m = None
    return m.group(1) if m else _version("flare-rt")


def machine_info(repo: Path) -> dict:
    import psutil

    vm = psutil.virtual_memory()
    versions = {d: _version(d) for d in ("torch", "onnxruntime", "nnunetv2", "numpy", "SimpleITK", "nibabel", "scipy",
                                          "psutil", "cupy-cuda13x", "cupy-cuda12x", "nvidia-ml-py")}
    versions["flare-rt"] = _flare_rt_version(repo)
    dirty = _git(repo, "status", "--porcelain", "--", "flare_rt")
    return {
        "cpu_model": cpu_name(),
        "logical_cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "ram_gb": round(vm.total / 1e9, 1),
        "ram_available_gb_at_start": round(vm.available / 1e9, 1),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "gpu": "none used (CPU benchmark)",
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
        "git_commit": _git(repo, "rev-parse", "--short", "HEAD"),
        "flare_rt_dirty": bool(dirty) if dirty is not None else None,
        "sampler": SAMPLER_METHOD,
    }
