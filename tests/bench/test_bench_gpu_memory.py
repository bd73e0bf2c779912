"""The NVML memory sampler, driven by a scripted source instead of a GPU."""
from __future__ import annotations

import threading

import pytest

from gpu_memory import (GpuMemorySampler, GpuMemoryTrace, GpuUnavailableError, NvmlSource, SeriesSource,
                        sample_loop, summary)


def test_trace_numbers_are_the_challenges():
    trace = GpuMemoryTrace("fake", idle_mib=500.0, t_s=[0.0, 0.1, 0.2, 0.3], samples_mib=[500, 1300, 2100.5, 900])
    assert trace.max_mib == 2100.5
    assert trace.max_minus_idle_mib == 1600.5
    assert trace.auc_mib_s == pytest.approx((500 + 1300 + 2100.5 + 900) * 0.1)
    j = trace.to_json()
    assert (j["max_mib"], j["max_minus_idle_mib"], j["n_samples"]) == (2100.5, 1600.5, 4)
    assert j["samples_mib"] == [500, 1300, 2100.5, 900]
    assert summary(j) == {"max_mib": 2100.5, "max_minus_idle_mib": 1600.5, "auc_mib_s": pytest.approx(480.05)}


def test_empty_trace_reports_nothing():
    trace = GpuMemoryTrace("fake", idle_mib=10.0)
    assert trace.max_mib is None and trace.max_minus_idle_mib is None and trace.auc_mib_s == 0
    assert summary(trace.to_json()) == {"max_mib": None, "max_minus_idle_mib": None, "auc_mib_s": None}


class FakeClockEvent(threading.Event):
    """An event whose wait() advances a fake clock instead of sleeping (deterministic loop)."""

    def __init__(self, clock: list[float]):
        super().__init__()
        self.clock, self.waits = clock, []

    def wait(self, timeout=None):
        self.waits.append(timeout)
        self.clock[0] += timeout
        return self.is_set()


def test_sample_loop_queries_then_sleeps_the_interval_until_stopped():
    clock = [100.0]
    stop = FakeClockEvent(clock)
    series = [512, 900, 4096, 3000, 700]
    src = SeriesSource(series, on_read=lambda n: stop.set() if n == len(series) else None)
    trace = GpuMemoryTrace("fake", idle_mib=512.0, interval_s=0.1)
    sample_loop(src, stop, trace, t0=100.0, clock=lambda: clock[0])
    assert trace.samples_mib == series
    assert trace.t_s == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    assert stop.waits == [0.1] * len(series)  # one sleep of 0.1 s after each query, as the challenge
    assert trace.max_mib == 4096 and trace.max_minus_idle_mib == 4096 - 512
    assert trace.auc_mib_s == pytest.approx(sum(series) * 0.1)


def test_sample_loop_stops_on_a_failing_query():
    class Failing(SeriesSource):
        def used_mib(self):
            if self.reads == 2:
                raise OSError("driver went away")
            return super().used_mib()

    clock = [0.0]
    trace = GpuMemoryTrace("fake", idle_mib=0.0)
    sample_loop(Failing([1, 2, 3, 4]), FakeClockEvent(clock), trace, t0=0.0, clock=lambda: clock[0])
    assert trace.samples_mib == [1, 2]


def test_threaded_sampler_takes_idle_before_and_samples_a_prefix_of_the_series():
    series = [300, 310, 305] + [1000 + 10 * i for i in range(20)]
    enough = threading.Event()
    src = SeriesSource(series, on_read=lambda n: enough.set() if n >= 8 else None)
    sampler = GpuMemorySampler(src, interval_s=0.01, idle_readings=3)
    with sampler:
        assert enough.wait(5), "sampler thread did not query the source"
    trace = sampler.trace
    assert trace.idle_mib == 305  # median of the three readings before launch
    assert trace.device == "fake GPU"
    n = len(trace.samples_mib)
    expected = (series[3:] + [series[-1]] * n)[:n]  # the source repeats its last value when exhausted
    assert n >= 5 and trace.samples_mib == [float(v) for v in expected]
    assert trace.t_s == sorted(trace.t_s) and trace.t_s[0] >= 0
    assert trace.max_minus_idle_mib == trace.max_mib - 305
    reads = src.reads
    threading.Event().wait(0.05)
    assert src.reads == reads  # stopped: no query after stop()


def test_sampler_misuse_is_an_error():
    sampler = GpuMemorySampler(SeriesSource([1]), interval_s=0.01)
    with pytest.raises(RuntimeError, match="not started"):
        sampler.stop()
    with pytest.raises(ValueError, match="interval_s"):
        GpuMemorySampler(SeriesSource([1]), interval_s=0)


def test_nvml_source_without_a_gpu_says_why():
    import pynvml  # noqa: F401  (nvidia-ml-py, in the dev extra: its absence fails the test)

    try:
        src = NvmlSource(0)
    except GpuUnavailableError as exc:
        assert "NVML" in str(exc) or "GPU index" in str(exc)
    else:  # a machine with a GPU: the reading must be a plausible whole-device number
        d = src.describe()
        assert d["total_mib"] > 0 and 0 <= src.used_mib() <= d["total_mib"]
        src.close()
