"""CPU threads for the pipeline's numpy/SciPy passes.

Element-wise numpy operations and ``scipy.ndimage`` release the GIL, and a synchronous CPU backend's
threads are idle while the pipeline blends or resamples, so these passes split their work over threads.
On a GPU (CuPy) the work is one call or one loop on the stream, as before.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence, TypeVar

import numpy as np

T = TypeVar("T")
MAX_THREADS = 4  # the passes are memory-bound: more threads stop paying
_POOL: list[ThreadPoolExecutor] = []  # made on first use, kept for the process


def cpu_threads() -> int:
    """Usable cores (the process's CPU affinity), at most :data:`MAX_THREADS`."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    return max(1, min(MAX_THREADS, n))


def _count(threads: int | None, items: int, xp) -> int:
    """Threads a pass over ``items`` uses: ``threads`` (default all usable), never more than the usable
    cores or the items; one on a GPU."""
    return min(threads or cpu_threads(), cpu_threads(), items) if xp is np else 1


def _cuts(items: int, n: int) -> list[tuple[int, int]]:
    """``n`` contiguous near-equal ranges covering ``range(items)``."""
    edges = np.linspace(0, items, max(n, 1) + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def run_split(fn: Callable[[T], None], items: Sequence[T], threads: int | None = None, xp=np) -> None:
    """``fn(item)`` for every item. With numpy the items go, in contiguous groups, to up to ``threads``
    threads (default :func:`cpu_threads`; never more than the usable cores), the caller running the first
    group; ``fn`` must write disjoint outputs. With another array module: a plain loop."""
    n = _count(threads, len(items), xp)
    if n <= 1:
        for item in items:
            fn(item)
        return
    if not _POOL:
        _POOL.append(ThreadPoolExecutor(MAX_THREADS - 1, thread_name_prefix="flare-rt-cpu"))
    groups = [items[a:b] for a, b in _cuts(len(items), n)]

    def run(group):
        for item in group:
            fn(item)

    futures = [_POOL[0].submit(run, g) for g in groups[1:]]
    try:
        run(groups[0])
    finally:
        for f in futures:
            f.result()


def class_slices(num_classes: int, threads: int | None = None, xp=np) -> list[slice]:
    """The class axis cut into as many slices as :func:`run_split` would use threads (one on a GPU)."""
    return [slice(a, b) for a, b in _cuts(num_classes, _count(threads, num_classes, xp))]
