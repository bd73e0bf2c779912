"""Pseudo-label merging: annotated voxels never change, only missing classes fill background, filled classes
become annotated, low-confidence voxels become the ignore label."""
from __future__ import annotations

import numpy as np
import pytest

from flare_rt.labels import IGNORE_ID
from flare_rt.stages.merge import classes_to_fill, confidence_cut, merge_pseudo_labels

LIVER, RKIDNEY, SPLEEN, AORTA, STOMACH, TUMOUR = 1, 2, 3, 5, 11, 14


def test_the_rules_on_a_small_example():
    annotation = np.array([[0, 1, 1, 0, 0, 0]], np.uint8)  # annotates liver and spleen (no spleen here)
    pseudo = np.array([[5, 3, 5, 5, 1, 11]], np.uint8)  # the model's opinion everywhere
    m = merge_pseudo_labels(annotation, (0, LIVER, SPLEEN), pseudo, fill=(AORTA, SPLEEN, LIVER))
    # liver voxels kept although the model says otherwise; the model's liver and spleen are not taken
    # (the case annotates them: its background there is "not liver / not spleen"); aorta fills background;
    # stomach was not asked for
    assert m.labels.tolist() == [[5, 1, 1, 5, 0, 0]]
    assert m.annotated == (0, LIVER, SPLEEN, AORTA)
    assert m.filled == {AORTA: 2} and m.ignored == 0


def test_annotated_voxels_never_change_and_only_missing_classes_are_filled():
    rng = np.random.default_rng(0)
    for _ in range(20):
        annotated = tuple(sorted({0, *rng.choice(np.arange(1, 15), rng.integers(1, 8), replace=False).tolist()}))
        annotation = rng.choice(np.array(annotated, np.uint8), size=(6, 20, 20))
        annotation[rng.random(annotation.shape) < 0.5] = 0
        pseudo = rng.integers(0, 15, size=annotation.shape).astype(np.uint8)
        fill = tuple(rng.choice(np.arange(1, 15), 6, replace=False).tolist())
        conf = rng.integers(0, 256, size=annotation.shape).astype(np.uint8)
        threshold = float(rng.choice([0.3, 0.6, 0.9]))
        m = merge_pseudo_labels(annotation, annotated, pseudo, fill, conf, threshold)
        fg = annotation > 0
        assert np.array_equal(m.labels[fg], annotation[fg])  # rule 1
        changed = m.labels != annotation
        new = set(np.unique(m.labels[changed]).tolist()) - {IGNORE_ID}
        allowed = set(fill) - set(annotated)
        assert new <= allowed  # rule 2: only classes the case does not annotate, and only those asked for
        took = changed & (m.labels != IGNORE_ID)
        assert np.array_equal(m.labels[took], pseudo[took]) and not (took & fg).any()
        confident = conf >= confidence_cut(threshold)
        assert np.array_equal(m.labels == IGNORE_ID, ~fg & ~confident)  # rule 4, background voxels only
        expected_fill = ~fg & confident & np.isin(pseudo, list(allowed))
        assert np.array_equal(took, expected_fill)
        assert m.annotated == tuple(sorted(set(annotated) | allowed | {0}))  # rule 3
        assert m.ignored == int((m.labels == IGNORE_ID).sum())


def test_unlabelled_cases_get_the_asked_classes_and_nothing_is_ignored_without_a_threshold():
    pseudo = np.array([[[0, 1, 2, 14, 13]]], np.uint8)
    m = merge_pseudo_labels(None, (), pseudo, fill=range(1, 14))
    assert m.labels.tolist() == [[[0, 1, 2, 0, 13]]]  # tumour not asked for
    assert m.annotated == tuple(range(14)) and m.ignored == 0
    nothing = merge_pseudo_labels(np.zeros_like(pseudo), (0, *range(1, 15)), pseudo, fill=range(1, 15),
                                  confidence=np.zeros_like(pseudo), threshold=0.9)
    assert not nothing.labels.any() and nothing.ignored == 0  # a fully annotated case is left alone


def test_existing_ignored_voxels_stay_ignored_and_the_cut_is_a_probability():
    annotation = np.array([[IGNORE_ID, 0, 0]], np.uint8)
    m = merge_pseudo_labels(annotation, (0, 1), np.array([[5, 5, 5]], np.uint8), fill=(5,),
                            confidence=np.array([[255, 127, 128]], np.uint8), threshold=0.5)
    assert m.labels.tolist() == [[IGNORE_ID, IGNORE_ID, 5]]
    assert confidence_cut(0.5) == 128 and confidence_cut(1.0) == 255
    with pytest.raises(ValueError, match="confidence map"):
        merge_pseudo_labels(annotation, (0, 1), annotation, fill=(5,), threshold=0.5)


def test_classes_to_fill_uses_only_what_the_model_learnt():
    assert classes_to_fill((0, 1, 2, 3, 4, 13, 14), range(1, 15), range(1, 14)) == (5, 6, 7, 8, 9, 10, 11, 12)
    assert classes_to_fill((0, *range(1, 14)), (TUMOUR,), range(1, 14)) == ()  # the model never saw a tumour
    assert classes_to_fill((), range(1, 15), (1, 3)) == (1, 3)
