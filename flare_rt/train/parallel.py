"""One helper for the per-case preparation steps: a process pool with a tqdm bar, results in input order."""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import TypeVar

from tqdm import tqdm

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


def parallel_map(fn: Callable[[T], R], items: Sequence[T], workers: int, desc: str,
                 progress: bool = True) -> list[R]:
    """``[fn(x) for x in items]`` in ``workers`` processes (in this process when ``workers <= 1`` or there
    is one item). ``fn`` must be a module-level function; the first exception is re-raised."""
    if not items:
        return []
    bar = tqdm(total=len(items), desc=desc, unit="case", disable=not progress, leave=False)
    with bar:
        if workers <= 1 or len(items) == 1:
            out = []
            for x in items:
                out.append(fn(x))
                bar.update()
            return out
        results: dict[int, R] = {}
        with ProcessPoolExecutor(max_workers=min(workers, len(items))) as pool:
            futures = {pool.submit(fn, x): i for i, x in enumerate(items)}
            for fut in as_completed(futures):
                results[futures[fut]] = fut.result()
                bar.update()
        return [results[i] for i in range(len(items))]
