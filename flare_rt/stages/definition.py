"""The pipeline definition: which cases, which stages, which model pseudo-labels what, and the budgets.

A definition is JSON, loaded into the frozen dataclasses below and checked before anything runs (every
stage's training config is built once, so a bad override fails at load time, not hours later)::

    {"name": "paper",
     "dataset": {"annotations": null},                     # a FLARE23 / nnU-Net folder (--dataset)
     "defaults": {"overrides": {"runtime.num_workers": 8}},
     "case_sets": {"dataset1": {"annotates_all": [1, 2, ..., 13]}, ...},
     "stages": [{"name": "stage1", "train": ["dataset1"], "model": "big",
                 "budget": {"epochs": 1000, "iterations_per_epoch": 250}},
                {"name": "stage2", "train": ["dataset2"], "model": "big",
                 "pseudo_label": [{"model": "stage1", "cases": ["dataset2"], "classes": "missing"}]}, ...]}

Case sets are selected on the dataset's own annotations (:mod:`flare_rt.stages.select`). ``classes``
is a list of class ids or ``"missing"``: the classes a case does not annotate that the labelling model
was trained on. ``model`` is a preset (``big``, ``small``, ``tiny``) or a training config JSON (relative
to the definition); ``overrides`` are ``section.key`` values applied to it, after the definition's
``defaults``; ``budget`` sets the schedule. ``init`` starts a stage from an earlier stage's weights.
A stage referring to a stage that was skipped gets the model of the nearest earlier stage that ran.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..labels import NAMES

DEFINITIONS_DIR = Path(__file__).resolve().parent / "definitions"
ALL_CLASSES: tuple[int, ...] = tuple(k for k in sorted(NAMES) if k > 0)
MISSING = "missing"


def _ints(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ConfigError(f"{where} must be a list of class ids, got {value!r}")
    bad = [v for v in value if v not in ALL_CLASSES]
    if bad:
        raise ConfigError(f"{where}: class ids {bad} are not FLARE23 classes 1..{ALL_CLASSES[-1]}")
    return tuple(sorted(set(value)))


def _names(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where} must be a name or a list of names, got {value!r}")
    return tuple(value)


def _object(value: Any, where: str, known: set[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a JSON object, got {type(value).__name__}")
    unknown = sorted(set(value) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}; valid keys are {sorted(known)}")
    return value


@dataclass(frozen=True)
class CaseSelector:
    """A named set of cases, chosen by the classes they annotate. Every given condition must hold."""

    name: str
    annotates_all: tuple[int, ...] | None = None  # each of these classes is annotated (others may be too)
    annotates_exactly: tuple[int, ...] | None = None  # the annotated classes are these (background aside)
    annotates_any: tuple[int, ...] | None = None  # at least one of these is annotated
    labelled: bool | None = None  # True: has a label map; False: unlabelled
    cases: tuple[str, ...] | None = None  # only these case ids
    exclude: tuple[str, ...] = ()  # cases of these (earlier) case sets are left out

    def rule(self) -> dict[str, Any]:
        """The conditions, as written in the definition (for messages and reports)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()
                if k != "name" and v not in (None, ())}

    def describe(self) -> str:
        return f"{self.name} {json.dumps(self.rule())}"


@dataclass(frozen=True)
class PseudoLabelStep:
    """``model`` (an earlier stage) labels ``classes`` of the cases in ``cases`` (case-set names)."""

    model: str
    cases: tuple[str, ...]
    classes: tuple[int, ...] | None = None  # None: "missing"
    confidence_threshold: float | None = None  # voxels whose winning-class probability is below: ignored
    mode: str = "fast"  # the runtime's mode (fast / faithful)
    tta: bool | None = None  # None: the bundle's default

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["classes"] = MISSING if self.classes is None else list(self.classes)
        d["cases"] = list(self.cases)
        return d


@dataclass(frozen=True)
class Budget:
    epochs: int
    iterations_per_epoch: int
    batch_size: int | None = None  # None: the model config's

    def overrides(self) -> dict[str, Any]:
        out: dict[str, Any] = {"schedule.epochs": self.epochs,
                               "schedule.iterations_per_epoch": self.iterations_per_epoch}
        if self.batch_size is not None:
            out["schedule.batch_size"] = self.batch_size
        return out

    @property
    def iterations(self) -> int:
        return self.epochs * self.iterations_per_epoch


@dataclass(frozen=True)
class StageDef:
    name: str
    train: tuple[str, ...]  # case-set names; their union is the training set
    model: str = "big"  # preset name or training config JSON path
    budget: Budget | None = None  # None: the model config's schedule
    overrides: tuple[tuple[str, Any], ...] = ()  # ("section.key", value), after the definition's defaults
    pseudo_label: tuple[PseudoLabelStep, ...] = ()
    init: str | None = None  # an earlier stage whose final weights this stage starts from
    optional: bool = False  # skipped (not an error) when a case set is empty or a model cannot be had
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "train": list(self.train), "model": self.model,
                "budget": asdict(self.budget) if self.budget else None, "overrides": dict(self.overrides),
                "pseudo_label": [p.to_dict() for p in self.pseudo_label], "init": self.init,
                "optional": self.optional, "description": self.description}


@dataclass(frozen=True)
class CaseSpec:
    """One case of an explicit dataset (paths relative to the dataset folder)."""

    id: str
    image: str  # NIfTI/MHA/NRRD file or DICOM series folder
    label: str | None = None
    annotated: tuple[int, ...] | None = None  # None: inferred from the label values present
    resample_label: bool = False  # the label matches the image in physical space only (e.g. stored flipped)


@dataclass(frozen=True)
class DatasetSpec:
    """Either explicit ``cases`` or (when empty) a FLARE23 / nnU-Net raw folder given as ``--dataset``."""

    cases: tuple[CaseSpec, ...] = ()
    annotations: str | None = None  # folder layout: JSON {case: [class ids]} (relative to the dataset folder)
    images: str = "imagesTr"
    labels: str = "labelsTr"
    unlabelled: str = "unlabeledTr"


@dataclass(frozen=True)
class PipelineDefinition:
    name: str
    stages: tuple[StageDef, ...]
    case_sets: tuple[CaseSelector, ...]
    dataset: DatasetSpec = field(default_factory=DatasetSpec)
    defaults: tuple[tuple[str, Any], ...] = ()  # overrides applied to every stage
    description: str = ""
    base_dir: str = "."  # where relative model config paths are resolved

    def stage(self, name: str) -> StageDef:
        for s in self.stages:
            if s.name == name:
                return s
        raise ConfigError(f"pipeline {self.name!r} has no stage {name!r}; stages: {[s.name for s in self.stages]}")

    def case_set(self, name: str) -> CaseSelector:
        for c in self.case_sets:
            if c.name == name:
                return c
        raise ConfigError(f"pipeline {self.name!r} has no case set {name!r}; case sets: "
                          f"{[c.name for c in self.case_sets]}")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description,
                "dataset": {**asdict(self.dataset), "cases": [asdict(c) for c in self.dataset.cases]},
                "defaults": {"overrides": dict(self.defaults)},
                "case_sets": {c.name: c.rule() for c in self.case_sets},
                "stages": [s.to_dict() for s in self.stages]}


# -- parsing ---------------------------------------------------------------------------------------
def _selector(name: str, d: Any) -> CaseSelector:
    where = f"case_sets.{name}"
    d = _object(d, where, {f.name for f in fields(CaseSelector)} - {"name"})
    kw: dict[str, Any] = {"name": name}
    for key in ("annotates_all", "annotates_exactly", "annotates_any"):
        if d.get(key) is not None:
            kw[key] = _ints(d[key], f"{where}.{key}")
    if d.get("labelled") is not None:
        if not isinstance(d["labelled"], bool):
            raise ConfigError(f"{where}.labelled must be true or false, got {d['labelled']!r}")
        kw["labelled"] = d["labelled"]
    if d.get("cases") is not None:
        kw["cases"] = _names(d["cases"], f"{where}.cases")
    kw["exclude"] = _names(d.get("exclude", []), f"{where}.exclude")
    if len(kw) == 2 and not kw["exclude"]:
        raise ConfigError(f"{where} has no condition; give annotates_all, annotates_exactly, annotates_any, "
                          "labelled, cases or exclude")
    return CaseSelector(**kw)


def _overrides(d: Any, where: str) -> tuple[tuple[str, Any], ...]:
    if d is None:
        return ()
    if not isinstance(d, dict) or not all(isinstance(k, str) and "." in k for k in d):
        raise ConfigError(f"{where} must be an object of 'section.key': value, e.g. {{\"optim.lr\": 0.01}}, got {d!r}")
    return tuple(sorted(d.items()))


def _pseudo(d: Any, where: str) -> PseudoLabelStep:
    d = _object(d, where, {f.name for f in fields(PseudoLabelStep)})
    if "model" not in d or "cases" not in d:
        raise ConfigError(f"{where} needs 'model' (an earlier stage) and 'cases' (case-set names)")
    classes = d.get("classes", MISSING)
    if classes != MISSING:
        classes = _ints(classes, f"{where}.classes")
    threshold = d.get("confidence_threshold")
    if threshold is not None and not (isinstance(threshold, (int, float)) and 0 < threshold <= 1):
        raise ConfigError(f"{where}.confidence_threshold must be in (0, 1] (a probability), got {threshold!r}")
    if d.get("tta") is not None and not isinstance(d["tta"], bool):
        raise ConfigError(f"{where}.tta must be true, false or null (the bundle's default), got {d['tta']!r}")
    mode = d.get("mode", "fast")
    if mode not in ("fast", "faithful"):
        raise ConfigError(f"{where}.mode must be fast or faithful, got {mode!r}")
    return PseudoLabelStep(model=str(d["model"]), cases=_names(d["cases"], f"{where}.cases"),
                           classes=None if classes == MISSING else classes,
                           confidence_threshold=None if threshold is None else float(threshold), mode=mode,
                           tta=d.get("tta"))


def _budget(d: Any, where: str) -> Budget | None:
    if d is None:
        return None
    d = _object(d, where, {f.name for f in fields(Budget)})
    try:
        b = Budget(**d)
    except TypeError as exc:
        raise ConfigError(f"{where} needs epochs and iterations_per_epoch ({exc})") from exc
    for key in ("epochs", "iterations_per_epoch", "batch_size"):
        value = getattr(b, key)
        if not (isinstance(value, int) and not isinstance(value, bool)) and not (key == "batch_size" and value is None):
            raise ConfigError(f"{where}.{key} must be an integer, got {json.dumps(value)}")
    if b.epochs < 1 or b.iterations_per_epoch < 1 or (b.batch_size is not None and b.batch_size < 1):
        raise ConfigError(f"{where}: epochs, iterations_per_epoch and batch_size must be >= 1, got {d}")
    return b


def _stage(d: Any, i: int) -> StageDef:
    d = _object(d, f"stages[{i}]", {f.name for f in fields(StageDef)})
    if not isinstance(d.get("name"), str) or not d["name"]:
        raise ConfigError(f"stages[{i}] needs a 'name'")
    where = f"stage {d['name']!r}"
    if "train" not in d:
        raise ConfigError(f"{where} needs 'train': the case sets it trains on")
    if not isinstance(d.get("optional", False), bool):
        raise ConfigError(f"{where}.optional must be true or false, got {d['optional']!r}")
    steps = d.get("pseudo_label") or []
    if not isinstance(steps, list):
        raise ConfigError(f"{where}.pseudo_label must be a list of steps")
    return StageDef(name=d["name"], train=_names(d["train"], f"{where}.train"), model=str(d.get("model", "big")),
                    budget=_budget(d.get("budget"), f"{where}.budget"),
                    overrides=_overrides(d.get("overrides"), f"{where}.overrides"),
                    pseudo_label=tuple(_pseudo(p, f"{where}.pseudo_label[{k}]") for k, p in enumerate(steps)),
                    init=d.get("init"), optional=bool(d.get("optional", False)),
                    description=str(d.get("description", "")))


def _dataset(d: Any) -> DatasetSpec:
    d = _object(d or {}, "dataset", {f.name for f in fields(DatasetSpec)})
    cases = []
    for i, c in enumerate(d.get("cases") or []):
        c = _object(c, f"dataset.cases[{i}]", {f.name for f in fields(CaseSpec)})
        if not isinstance(c.get("id"), str) or not isinstance(c.get("image"), str):
            raise ConfigError(f"dataset.cases[{i}] needs 'id' and 'image' (a path relative to the dataset folder)")
        ann = c.get("annotated")
        cases.append(CaseSpec(id=c["id"], image=c["image"], label=c.get("label"),
                              annotated=None if ann is None else _ints(ann, f"dataset.cases[{i}].annotated"),
                              resample_label=bool(c.get("resample_label", False))))
    ids = [c.id for c in cases]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ConfigError(f"dataset.cases: case ids occur twice: {dupes}")
    return DatasetSpec(cases=tuple(cases), **{k: v for k, v in d.items() if k != "cases"})


def _check_references(p: PipelineDefinition) -> None:
    names = [s.name for s in p.stages]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"pipeline {p.name!r}: stage names occur twice: {dupes}")
    sets = [c.name for c in p.case_sets]
    for k, c in enumerate(p.case_sets):
        later = [e for e in c.exclude if e not in sets[:k]]
        if later:
            raise ConfigError(f"case_sets.{c.name}.exclude names {later}, which are not case sets defined before it")
    for i, s in enumerate(p.stages):
        earlier = names[:i]
        refs = [("train", n) for n in s.train] + [(f"pseudo_label[{k}].cases", n)
                                                   for k, step in enumerate(s.pseudo_label) for n in step.cases]
        for key, n in refs:
            if n not in sets:
                raise ConfigError(f"stage {s.name!r}.{key} names case set {n!r}, which is not defined; "
                                  f"case sets: {sets}")
        models = [(f"pseudo_label[{k}].model", step.model) for k, step in enumerate(s.pseudo_label)]
        if s.init is not None:
            models.append(("init", s.init))
        for key, m in models:
            if m not in earlier:
                raise ConfigError(f"stage {s.name!r}.{key} is {m!r}, which is not an earlier stage "
                                  f"(earlier: {earlier})")


def definition_from_dict(d: dict[str, Any], base_dir: str | Path = ".", where: str = "pipeline") -> PipelineDefinition:
    d = _object(d, where, {"name", "description", "dataset", "defaults", "case_sets", "stages"})
    if not isinstance(d.get("name"), str) or not d["name"]:
        raise ConfigError(f"{where} needs a 'name'")
    if not isinstance(d.get("case_sets"), dict) or not d["case_sets"]:
        raise ConfigError(f"{where} needs 'case_sets': an object of named selectors")
    if not isinstance(d.get("stages"), list) or not d["stages"]:
        raise ConfigError(f"{where} needs 'stages': a non-empty list")
    defaults = _object(d.get("defaults") or {}, "defaults", {"overrides"})
    p = PipelineDefinition(name=d["name"], description=str(d.get("description", "")),
                           stages=tuple(_stage(s, i) for i, s in enumerate(d["stages"])),
                           case_sets=tuple(_selector(k, v) for k, v in d["case_sets"].items()),
                           dataset=_dataset(d.get("dataset")), defaults=_overrides(defaults.get("overrides"),
                                                                                   "defaults.overrides"),
                           base_dir=str(Path(base_dir).resolve()))
    _check_references(p)
    return p


def definition_path(name_or_path: str | Path) -> Path:
    """A definition file, or the packaged definition of that name (``paper``, ``demo``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    packaged = DEFINITIONS_DIR / f"{name_or_path}.json"
    if packaged.is_file() and not str(name_or_path).endswith(".json"):
        return packaged
    raise ConfigError(f"{name_or_path}: pipeline definition not found; give a JSON file or a packaged definition "
                      f"({', '.join(sorted(p.stem for p in DEFINITIONS_DIR.glob('*.json')))})")


def load_definition(name_or_path: str | Path) -> PipelineDefinition:
    """Read and check a definition (every stage's training config is built once here)."""
    from .plan import stage_config

    path = definition_path(name_or_path)
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from exc
    definition = definition_from_dict(d, path.parent, str(path))
    for s in definition.stages:
        stage_config(definition, s, Path("/nonexistent/index.json"), Path("/nonexistent/out"))
    return definition
