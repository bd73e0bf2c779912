"""Per-voxel confidence of the winning class: the largest softmax probability, as one uint8 map
(0..255 for 0..1), built row by row while the labels stream, so the K-class probabilities never exist
at full size. Pseudo-labelling thresholds it to mark voxels as ignored.

Rows the sliding window never reached (fast mode skips tiles that hold no body) carry the window's
"certain background" logits, exactly (1, 0, ..., 0): they are given full confidence, 255.
"""
from __future__ import annotations

import numpy as np

from .xp import array_module

SCALE = 255


def confidence_u8(logits):
    """uint8 ``round(255 * max softmax)`` over axis 0 of ``logits`` (K, ...)."""
    xp = array_module(logits)
    top = logits.max(0)
    total = xp.exp(logits - top[None]).sum(0)
    conf = xp.rint(SCALE / total)
    certain = (logits[0] == 1) & (logits[1:] == 0).all(0)  # rows no tile covered (fast mode)
    return xp.where(certain, SCALE, xp.clip(conf, 0, SCALE)).astype(np.uint8)


class ConfidenceRows:
    """``on_plane(row, logits)`` callback for :func:`flare_rt.postprocess.labels_faithful`: fills ``out``,
    a (rows, Y, X) uint8 array (or view) of the output grid, as the rows stream."""

    def __init__(self, out):
        self.array = out

    def __call__(self, row: int, logits) -> None:
        self.array[row] = confidence_u8(logits)
