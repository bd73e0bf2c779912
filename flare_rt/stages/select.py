"""Case sets: the cases of a dataset index chosen by the classes they annotate (background aside)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

from ..errors import ConfigError
from ..train.dataset import BACKGROUND, DatasetIndex
from .definition import CaseSelector, PipelineDefinition, StageDef


def annotated_classes(annotated: Sequence[int]) -> frozenset[int]:
    return frozenset(int(a) for a in annotated) - {BACKGROUND}


def matches(selector: CaseSelector, case_id: str, labelled: bool, annotated: Sequence[int],
            excluded: frozenset[str] = frozenset()) -> bool:
    """Whether one case satisfies every condition of ``selector``."""
    ann = annotated_classes(annotated)
    return not (
        case_id in excluded
        or (selector.cases is not None and case_id not in selector.cases)
        or (selector.labelled is not None and labelled != selector.labelled)
        or (selector.annotates_all is not None and not set(selector.annotates_all) <= ann)
        or (selector.annotates_exactly is not None and set(selector.annotates_exactly) != ann)
        or (selector.annotates_any is not None and not set(selector.annotates_any) & ann))


def select_case_sets(definition: PipelineDefinition, index: DatasetIndex) -> dict[str, tuple[str, ...]]:
    """Every case set of the definition, in index order, selected on the dataset's own annotations."""
    ids = {c.id for c in index.cases}
    out: dict[str, tuple[str, ...]] = {}
    for sel in definition.case_sets:
        unknown = sorted(set(sel.cases or ()) - ids)
        if unknown:
            raise ConfigError(f"case set {sel.describe()} names cases that are not in the dataset: {unknown[:5]}")
        excluded = frozenset(i for name in sel.exclude for i in out[name])
        out[sel.name] = tuple(c.id for c in index.cases if matches(sel, c.id, c.labelled, c.annotated, excluded))
    return out


def stage_cases(sets: Mapping[str, Sequence[str]], names: Sequence[str]) -> tuple[str, ...]:
    """The union of the named case sets, without repeats, in order."""
    return tuple(dict.fromkeys(i for n in names for i in sets[n]))


def empty_sets_reason(definition: PipelineDefinition, stage: StageDef,
                      sets: Mapping[str, Sequence[str]], n_cases: int) -> str | None:
    """Why ``stage`` has nothing to work on (its training set, or the cases of one of its pseudo-label
    steps, is empty), naming the selectors; None when it has cases."""
    groups = [("training set", stage.train)] + [(f"pseudo-label step {k + 1} ({step.model})", step.cases)
                                                for k, step in enumerate(stage.pseudo_label)]
    for what, names in groups:
        if not stage_cases(sets, names):
            rules = "; ".join(definition.case_set(n).describe() for n in names)
            return (f"stage {stage.name!r}: its {what} is empty: case set(s) {rules} select none of the "
                    f"{n_cases} cases")
    return None
