"""Merging pseudo-labels into a partial annotation (pure functions).

The rules:

1. Annotated classes are kept exactly: a voxel the annotation labels with a class (or marks ignored) never
   changes.
2. Pseudo-labels fill only voxels the annotation left as background, and only with the classes asked for
   that the case does not annotate.
3. The filled classes then count as annotated (for the partial-label loss).
4. With a confidence threshold, a voxel the annotation left as background whose pseudo-label confidence
   (probability of the winning class) is below it becomes ``IGNORE_ID``: it might be background or a
   filled class, so it carries no loss either way.

A case without a label map is an all-background annotation that annotates nothing.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..labels import IGNORE_ID
from ..train.dataset import BACKGROUND

CONFIDENCE_SCALE = 255  # the runtime's uint8 confidence map: 255 = probability 1


@dataclass(frozen=True)
class Merged:
    labels: np.ndarray  # uint8 (z, y, x), IGNORE_ID where ignored
    annotated: tuple[int, ...]  # annotated classes after the merge (background included)
    filled: dict[int, int]  # class -> voxels given that class by the pseudo-labels
    ignored: int  # voxels marked IGNORE_ID by this merge


def classes_to_fill(annotated: Sequence[int], wanted: Sequence[int], known: Sequence[int]) -> tuple[int, ...]:
    """The classes pseudo-labels may fill: ``wanted`` that the case does not annotate and the labelling
    model was trained on (``known``)."""
    return tuple(sorted((set(wanted) & set(known)) - set(annotated) - {BACKGROUND}))


def confidence_cut(threshold: float) -> int:
    """The uint8 confidence below which a voxel is ignored, for a probability ``threshold``."""
    return int(np.ceil(threshold * CONFIDENCE_SCALE - 1e-9))


def merge_pseudo_labels(annotation: np.ndarray | None, annotated: Sequence[int], pseudo: np.ndarray,
                        fill: Sequence[int], confidence: np.ndarray | None = None,
                        threshold: float | None = None) -> Merged:
    """Merge ``pseudo`` (uint8 labels on the annotation's grid) into ``annotation`` by the module's rules.

    ``annotated``: the classes ``annotation`` annotates; ``fill``: the classes to take from ``pseudo``
    (those the case annotates are left out); ``confidence``: the runtime's uint8 map, needed with
    ``threshold`` (a probability in (0, 1])."""
    if annotation is None:
        annotation, annotated = np.zeros(pseudo.shape, np.uint8), ()
    if annotation.shape != pseudo.shape:
        raise ValueError(f"pseudo-labels {pseudo.shape} and annotation {annotation.shape} differ in shape")
    fill = tuple(sorted(set(int(k) for k in fill) - set(int(a) for a in annotated) - {BACKGROUND, IGNORE_ID}))
    out = np.array(annotation, dtype=np.uint8, copy=True)
    free = annotation == BACKGROUND
    ignored = 0
    if fill:
        take = free & np.isin(pseudo, fill)
        out[take] = pseudo[take]
        if threshold is not None:
            if confidence is None or confidence.shape != pseudo.shape:
                raise ValueError("a confidence threshold needs the confidence map of the pseudo-labels")
            unsure = free & (confidence < confidence_cut(threshold))
            out[unsure] = IGNORE_ID
            ignored = int(unsure.sum())
    filled = {k: int(((out == k) & free).sum()) for k in fill}
    after = tuple(sorted(set(int(a) for a in annotated) | set(fill) | {BACKGROUND}))
    return Merged(out, after, filled, ignored)
