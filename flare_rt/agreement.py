"""Agreement of two label maps: per-class Dice (classes large enough to mean something) and the
fraction of voxels with the same label. Used by ``flare-rt quantize`` (variant vs fp32 bundle) and
``bench/`` (systems vs nnU-Net and vs flare-rt fp32)."""
from __future__ import annotations

import numpy as np

MIN_VOXELS = 1000  # classes smaller than this in both maps are left out of the Dice


def label_agreement(ref: np.ndarray, test: np.ndarray, names: dict[int, str] | None = None,
                    min_voxels: int = MIN_VOXELS) -> dict:
    """Per-class Dice (foreground classes with >= ``min_voxels`` voxels in either map), the minimum of
    those, and overall voxel agreement. Raises ValueError on a shape mismatch."""
    if ref.shape != test.shape:
        raise ValueError(f"shape mismatch: reference {ref.shape}, test {test.shape}")
    names = names or {}
    k = int(max(ref.max(initial=0), test.max(initial=0))) + 1
    conf = np.bincount(ref.ravel().astype(np.int64) * k + test.ravel().astype(np.int64),
                       minlength=k * k).reshape(k, k)
    n_ref, n_test = conf.sum(1), conf.sum(0)
    dice = {}
    for c in range(1, k):
        if max(n_ref[c], n_test[c]) >= min_voxels:
            dice[names.get(c, str(c))] = float(2 * conf[c, c] / (n_ref[c] + n_test[c]))
    worst = min(dice, key=dice.get) if dice else None
    return {"dice": dice, "min_dice": dice[worst] if worst else None, "min_dice_class": worst,
            "voxel_agreement": float(np.trace(conf) / conf.sum()), "min_voxels": min_voxels,
            "voxels_ref": {names.get(c, str(c)): int(n_ref[c]) for c in range(1, k) if n_ref[c]},
            "voxels_test": {names.get(c, str(c)): int(n_test[c]) for c in range(1, k) if n_test[c]}}
