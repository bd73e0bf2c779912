"""Reorientation by axis permutation and flips only (no interpolation).

What a bundle's ``orientation`` asks of the image, before the network (the labels are mapped back exactly):

- a code (e.g. ``LPS``: x toward patient left, y posterior, z superior, DICOM convention): the array is
  permuted and flipped to it;
- ``"none"`` (the default, and what nnU-Net imports get): no anatomical orientation, but axial slice order.
  An image stored as axial slices (as abdominal CTs usually are) runs exactly as stored, flips and all, as
  nnU-Net runs it. An image stored with its axes permuted (sagittal or coronal stacking, ``z, x, y`` index
  axes) has them permuted back to axial order, never flipped: in stored order the network would see the
  body on its side and nnU-Net's answer is wrong;
- ``"stored"``: the stored array order whatever it is, nnU-Net's exact behaviour, for a model trained on
  images stored some other way.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import ConfigError
from .xp import array_module

_LETTERS = {"L": (0, 1), "R": (0, -1), "P": (1, 1), "A": (1, -1), "S": (2, 1), "I": (2, -1)}


@dataclass(frozen=True)
class Reorientation:
    """For arrays in (z, y, x) order: ``perm`` (np.transpose axes) then flips of the listed axes."""

    perm: tuple[int, int, int]
    flips: tuple[int, ...]

    @property
    def identity(self) -> bool:
        return self.perm == (0, 1, 2) and not self.flips

    def apply(self, array):
        """A view of ``array`` (numpy or CuPy) permuted and flipped to the target orientation."""
        xp = array_module(array)
        out = array.transpose(self.perm)
        for ax in self.flips:
            out = xp.flip(out, ax)
        return out

    def invert(self, array):
        xp = array_module(array)
        for ax in self.flips:
            array = xp.flip(array, ax)
        inv = tuple(int(i) for i in np.argsort(self.perm))
        return array.transpose(inv)

    def spacing(self, spacing):
        return tuple(spacing[p] for p in self.perm)


NONE = "none"  # axial slice order, flips as stored
STORED = "stored"  # the stored array order


def validate_code(code: str) -> str:
    code = code.upper()
    if code in ("NONE", "STORED"):
        return code.lower()
    if len(code) != 3 or any(c not in _LETTERS for c in code) or len({_LETTERS[c][0] for c in code}) != 3:
        raise ConfigError(f"orientation must be 'none', 'stored' or three letters from L/R, P/A, S/I, one per "
                          f"axis (e.g. LPS, RAS), got {code!r}")
    return code


def is_code(value) -> bool:
    """Whether ``value`` is an orientation exactly as :func:`validate_code` writes it (``none``, ``stored``,
    or an upper-case code), as bundle metadata and training configs must hold it."""
    try:
        return isinstance(value, str) and validate_code(value) == value
    except ConfigError:
        return False


def orientation_code(direction) -> str:
    """Closest DICOM-convention code of a SimpleITK direction (row-major 3x3, columns = index axes)."""
    d = np.asarray(direction, dtype=float).reshape(3, 3)
    letters = {(0, 1): "L", (0, -1): "R", (1, 1): "P", (1, -1): "A", (2, 1): "S", (2, -1): "I"}
    used, code = set(), []
    for j in np.argsort(-np.abs(d).max(axis=0)):  # most decisive axis first, as ITK does
        order = [p for p in np.argsort(-np.abs(d[:, j])) if p not in used]
        p = int(order[0])
        used.add(p)
        code.append((j, letters[(p, 1 if d[p, j] > 0 else -1)]))
    return "".join(c for _, c in sorted(code))


def axial_code(direction) -> str:
    """The code of ``direction``'s own axes put in axial order (left-right, then anterior-posterior, then
    superior-inferior), each axis keeping its stored sense: reached by a permutation, never a flip."""
    return "".join(sorted(orientation_code(direction), key=lambda c: _LETTERS[c][0]))


def effective_code(direction, orientation: str) -> str:
    """The code an array with SimpleITK ``direction`` has after :func:`plan_reorientation` to ``orientation``."""
    if orientation == STORED:
        return orientation_code(direction)
    return axial_code(direction) if orientation == NONE else orientation


def plan_reorientation(direction, target: str) -> Reorientation:
    """How to permute/flip a (z, y, x) array with SimpleITK ``direction`` so that its index axes point
    as ``target`` says (target letters are for x, y, z; ``none`` and ``stored`` as the module says)."""
    if target == STORED:
        return Reorientation((0, 1, 2), ())
    target = effective_code(direction, target)
    source = orientation_code(direction)
    src_axis = {_LETTERS[c][0]: (j, _LETTERS[c][1]) for j, c in enumerate(source)}  # phys -> (sitk axis, sign)
    perm_sitk, flips_sitk = [], []
    for k, c in enumerate(target):
        phys, sign = _LETTERS[c]
        j, s = src_axis[phys]
        perm_sitk.append(j)
        if s != sign:
            flips_sitk.append(k)
    # numpy axis i <-> sitk axis 2 - i
    perm = tuple(2 - perm_sitk[2 - i] for i in range(3))
    flips = tuple(sorted(2 - k for k in flips_sitk))
    return Reorientation(perm, flips)  # type: ignore[arg-type]
