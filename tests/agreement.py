"""Agreement between label maps, as the tests and benchmarks report it."""
from __future__ import annotations

import numpy as np


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks (1 when both are empty)."""
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int(np.logical_and(a, b).sum()) / s


def dice_per_class(a: np.ndarray, b: np.ndarray, min_voxels: int = 1000, classes=range(1, 15)) -> dict[int, float]:
    """Dice per class, for the classes with at least ``min_voxels`` voxels in either map."""
    out = {}
    for c in classes:
        na, nb = int((a == c).sum()), int((b == c).sum())
        if max(na, nb) >= min_voxels:
            out[c] = 2 * int(((a == c) & (b == c)).sum()) / (na + nb)
    return out
