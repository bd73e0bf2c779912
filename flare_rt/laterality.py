"""Left and right: which array axis is the patient's left-right axis, and the label swap a mirror along it
needs (right/left kidney 2 <-> 13, right/left adrenal 7 <-> 8).

Mirroring a CT along its left-right axis turns a right kidney into one that lies where a left kidney
lies; its label must follow, or training teaches the network that both sides are either kidney.
Which array axis that is depends on the image direction and the orientation the array was put in (in axial
order it is x; in the stored order of a case stored with permuted axes it may be z), never on the axis number.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .labels import LATERAL_PAIRS
from .orientation import effective_code


def lr_axis(direction: Sequence[float], orientation: str = "none") -> int:
    """The (z, y, x) array axis along the patient's left-right direction.

    ``direction``: the SimpleITK direction of the stored image. ``orientation``: what the array was
    reoriented to (:func:`flare_rt.orientation.plan_reorientation`: a code, ``"none"`` or ``"stored"``)."""
    code = effective_code(direction, orientation)
    sitk_axis = next(j for j, c in enumerate(code) if c in "LR")
    return 2 - sitk_axis  # SimpleITK axis j (x, y, z) is numpy axis 2 - j


def common_lr_axis(axes: Sequence[int | None]) -> int | None:
    """The left-right axis shared by every case, or None when they differ (or are unknown)."""
    found = set(axes)
    return found.pop() if len(found) == 1 and None not in found else None


def swap_table() -> np.ndarray:
    """A 256-entry uint8 lookup table swapping the lateral label pairs (every other value kept)."""
    lut = np.arange(256, dtype=np.uint8)
    for a, b in LATERAL_PAIRS:
        lut[a], lut[b] = b, a
    return lut


def swap_sides(labels: np.ndarray) -> np.ndarray:
    """``labels`` with the left and right classes exchanged."""
    return swap_table()[labels]


def swap_classes(classes: Sequence[int]) -> tuple[int, ...]:
    """A set of class ids (e.g. the annotated ones) with the left and right classes exchanged: a mirrored
    case that annotates only its right kidney annotates only a left one."""
    table = swap_table()
    return tuple(sorted(int(table[c]) for c in classes))
