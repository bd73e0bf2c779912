"""Whole-device GPU memory, sampled as the FLARE challenge samples it.

The challenge's efficiency script polls NVML in a separate process while ``docker run`` executes:
used = ``total - free`` of the whole device (MiB), one query, then ``sleep(0.1)``, again until the
container exits. It reports the maximum and AUC = sum(samples) * 0.1 (MiB·s). The CUDA context,
engines, workspaces and anything else on the card all count.

:class:`GpuMemorySampler` does the same in a thread of the benchmark process. NVML reads the
driver's counters and opens no CUDA context, so the sampler adds nothing to what it measures (the
benchmark process itself never imports torch or CuPy). The source is injectable: tests drive the
sampler with a scripted series (:class:`SeriesSource`) instead of a GPU.
"""
from __future__ import annotations

import logging
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

log = logging.getLogger("bench.gpu_memory")

INTERVAL_S = 0.1  # the challenge's sleep after each query
MIB = 1024 * 1024
METHOD = ("NVML (nvidia-ml-py) whole-device used = total - free, MiB; one query then sleep 0.1 s, in a thread of "
          "the benchmark process (which holds no CUDA context), from before launch to after exit; "
          "max = max(samples), AUC = sum(samples) * 0.1 MiB·s (FLARE); idle = median of readings taken just "
          "before launch")


class GpuUnavailableError(RuntimeError):
    """NVML cannot be used here (no driver, no device, no nvidia-ml-py)."""


class MemorySource(Protocol):
    def used_mib(self) -> float:
        """Whole-device used memory now, ``total - free``, in MiB."""

    def describe(self) -> dict:
        """Device name, index, total MiB, driver version."""


class NvmlSource:
    """The GPU ``index`` (NVML order) read through ``pynvml`` (package ``nvidia-ml-py``)."""

    def __init__(self, index: int = 0):
        try:
            import pynvml
        except ImportError as exc:
            raise GpuUnavailableError("GPU memory sampling needs NVML's Python binding: pip install nvidia-ml-py") \
                from exc
        self._nvml = pynvml
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            raise GpuUnavailableError(f"NVML cannot start ({exc}): no NVIDIA driver or GPU on this machine") from exc
        count = pynvml.nvmlDeviceGetCount()
        if not 0 <= index < count:
            pynvml.nvmlShutdown()
            raise GpuUnavailableError(f"GPU index {index} does not exist: NVML sees {count} device(s); "
                                      f"pass --gpu-index 0..{count - 1}")
        self.index = index
        self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)

    def used_mib(self) -> float:
        info = self._nvml.nvmlDeviceGetMemoryInfo(self._handle)
        return (info.total - info.free) / MIB

    def describe(self) -> dict:
        nv = self._nvml
        name = nv.nvmlDeviceGetName(self._handle)
        driver = nv.nvmlSystemGetDriverVersion()
        info = nv.nvmlDeviceGetMemoryInfo(self._handle)
        return {"name": name.decode() if isinstance(name, bytes) else name, "index": self.index,
                "total_mib": round(info.total / MIB), "driver": driver.decode() if isinstance(driver, bytes) else driver}

    def close(self) -> None:
        self._nvml.nvmlShutdown()


class SeriesSource:
    """A scripted source for tests: returns ``values`` in order, then repeats the last one; ``reads``
    counts the queries and ``on_read(n)`` is called after the n-th."""

    def __init__(self, values, name: str = "fake GPU", total_mib: float = 16384.0,
                 on_read: Callable[[int], None] | None = None):
        self.values, self.name, self.total_mib, self.on_read = list(values), name, total_mib, on_read
        self.reads = 0

    def used_mib(self) -> float:
        v = self.values[min(self.reads, len(self.values) - 1)]
        self.reads += 1
        if self.on_read:
            self.on_read(self.reads)
        return float(v)

    def describe(self) -> dict:
        return {"name": self.name, "index": 0, "total_mib": self.total_mib, "driver": "fake"}


# -- the trace ---------------------------------------------------------------------------------------------
@dataclass
class GpuMemoryTrace:
    """Samples of one run. ``t_s`` are seconds since the launch (the sampler's start)."""

    device: str
    idle_mib: float
    interval_s: float = INTERVAL_S
    t_s: list[float] = field(default_factory=list)
    samples_mib: list[float] = field(default_factory=list)

    @property
    def max_mib(self) -> float | None:
        return max(self.samples_mib) if self.samples_mib else None

    @property
    def max_minus_idle_mib(self) -> float | None:
        return None if self.max_mib is None else self.max_mib - self.idle_mib

    @property
    def auc_mib_s(self) -> float:
        """The challenge's AUC: sum of the samples times the nominal interval (not the measured spacing)."""
        return sum(self.samples_mib) * self.interval_s

    def to_json(self) -> dict:
        return {"device": self.device, "interval_s": self.interval_s, "idle_mib": round(self.idle_mib, 2),
                "max_mib": None if self.max_mib is None else round(self.max_mib, 2),
                "max_minus_idle_mib": None if self.max_mib is None else round(self.max_minus_idle_mib, 2),
                "auc_mib_s": round(self.auc_mib_s, 2), "n_samples": len(self.samples_mib),
                "t_s": [round(t, 3) for t in self.t_s], "samples_mib": [round(v, 2) for v in self.samples_mib]}


def summary(trace_json: dict | None) -> dict:
    """The three reported numbers of a stored trace (``to_json`` form), recomputed from its samples."""
    if not trace_json or not trace_json.get("samples_mib"):
        return {"max_mib": None, "max_minus_idle_mib": None, "auc_mib_s": None}
    s = trace_json["samples_mib"]
    return {"max_mib": max(s), "max_minus_idle_mib": max(s) - trace_json["idle_mib"],
            "auc_mib_s": sum(s) * trace_json.get("interval_s", INTERVAL_S)}


# -- the sampler -------------------------------------------------------------------------------------------
def sample_loop(source: MemorySource, stop: threading.Event, trace: GpuMemoryTrace, t0: float,
                clock: Callable[[], float] = time.perf_counter) -> None:
    """Query, record, wait ``interval_s`` (returning early only when stopped); until ``stop`` is set.
    A failing query ends the trace with a warning (the run itself goes on)."""
    while not stop.is_set():
        try:
            value = source.used_mib()
        except Exception as exc:  # NVML errors are not one class across versions
            log.warning("GPU memory query failed, sampling stops: %s", exc)
            return
        trace.t_s.append(clock() - t0)
        trace.samples_mib.append(value)
        stop.wait(trace.interval_s)


class GpuMemorySampler:
    """Start before the measured command, stop after it exits::

        with GpuMemorySampler(NvmlSource()) as s:
            run(...)
        trace = s.trace

    The idle reading (median of ``idle_readings`` queries ``interval_s`` apart) is taken in
    ``start`` before sampling begins, i.e. before the command is launched."""

    def __init__(self, source: MemorySource, interval_s: float = INTERVAL_S, idle_readings: int = 3,
                 device: str | None = None, clock: Callable[[], float] = time.perf_counter):
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.source, self.interval_s, self.idle_readings, self.clock = source, interval_s, idle_readings, clock
        self.device = device or source.describe()["name"]
        self.trace: GpuMemoryTrace | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def idle(self) -> float:
        readings = []
        for i in range(max(1, self.idle_readings)):
            if i:
                time.sleep(self.interval_s)
            readings.append(self.source.used_mib())
        return float(statistics.median(readings))

    def start(self) -> "GpuMemorySampler":
        if self._thread is not None:
            raise RuntimeError("sampler already started")
        self.trace = GpuMemoryTrace(self.device, self.idle(), self.interval_s)
        self._thread = threading.Thread(target=sample_loop, name="gpu-memory-sampler", daemon=True,
                                        args=(self.source, self._stop, self.trace, self.clock(), self.clock))
        self._thread.start()
        return self

    def stop(self) -> GpuMemoryTrace:
        if self._thread is None or self.trace is None:
            raise RuntimeError("sampler was not started")
        self._stop.set()
        self._thread.join(timeout=10 * self.interval_s + 5)
        return self.trace

    def __enter__(self) -> "GpuMemorySampler":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
