"""Running a pipeline definition: stage after stage, pseudo-labelling with earlier models and training
with :func:`flare_rt.train.train`, skipping finished stages and resuming an interrupted one.

Each stage has a content hash of everything its result depends on: its definition (and the defaults),
the training config that decides the model (paths and thread/worker counts aside), the content of its
cases' image and label files (a pseudo-label stands for the hash of what made it: model, image,
annotation, classes, settings), their annotated classes and the upstream models' bundle hashes. A stage
whose recorded hash matches is skipped; one that was interrupted resumes (pseudo-labels already written
are kept, training continues from its last checkpoint); one whose inputs changed starts over, and so
does everything downstream of it, because their hashes contain its model's.

Work folder::

    definition.json  run.json  hashes.json  report.md  report.png  model.onnx (the last stage's bundle)
    inputs/index.json                    the dataset index (the dataset's own annotations)
    inputs/labels/<case>.nii.gz          labels resampled onto their image's grid (``resample_label``)
    stages/<stage>/state.json            status, hash, cases, times, validation Dice, model hash
    stages/<stage>/labels/<case>.nii.gz  merged pseudo-labels, each with a <case>.json provenance sidecar
    stages/<stage>/index.json            the stage's training index
    stages/<stage>/train/                the trainer's output (model.onnx, checkpoints, progress.csv/png)
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..atomic import atomic_path, check_writable
from ..errors import ConfigError, InputImageError
from ..labels import IGNORE_ID
from .definition import ALL_CLASSES, PipelineDefinition, StageDef
from .hashing import FileHashes, digest
from .merge import classes_to_fill
from .plan import config_binding, stage_config
from .pseudolabel import FanOut, LabelJob, LabellerSpec, label_cases
from .select import empty_sets_reason, select_case_sets, stage_cases

log = logging.getLogger(__name__)

STATE = "state.json"
EpochHook = Callable[[str, Any], None]  # (stage name, flare_rt.train.progress.EpochRecord)


@dataclass(frozen=True)
class RunOptions:
    """How to run (none of it changes a stage's hash)."""

    hold_out: tuple[str, ...] = ()  # case ids left out of the dataset (e.g. for a held-out evaluation)
    backend: str = "auto"  # pseudo-labelling backend
    device: str = "auto"
    threads: int | None = None  # per pseudo-labelling worker
    fan: FanOut = field(default_factory=FanOut)
    train_threads: int | None = None  # torch CPU threads of training
    train_workers: int | None = None  # background data-loading processes of training
    keep_caches: bool = False  # keep each stage's preprocessing cache after it finishes
    progress: bool = True

    def __post_init__(self) -> None:
        """Refuse bad options here, before any stage runs (not when the first pseudo-labelling starts)."""
        from ..backends import check_backend_name, check_device

        check_backend_name(self.backend, "--backend")
        check_device(self.device, "--device")
        for flag, value, low in (("--threads", self.threads, 1), ("--train-threads", self.train_threads, 1),
                                 ("--train-workers", self.train_workers, 0), ("--workers", self.fan.workers, 1)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise ConfigError(f"{flag} must be an integer >= {low}, got {value!r}")

    def train_overrides(self) -> dict[str, Any]:
        out: dict[str, Any] = {"runtime.progress": self.progress}
        if self.train_threads is not None:
            out["runtime.threads"] = self.train_threads
        if self.train_workers is not None:
            out["runtime.num_workers"] = self.train_workers
        return out


@dataclass(frozen=True)
class CaseLabel:
    """A case's current label: the file, what it stands for (a content hash), its annotated classes."""

    label: str | None
    identity: str | None  # sha256 of the file, or "job:<key>" for a pseudo-label
    annotated: tuple[int, ...]
    source: str  # "dataset" or the stage whose pseudo-labels it holds


@dataclass(frozen=True)
class StageModel:
    stage: str
    bundle: str
    sha256: str
    checkpoint: str
    classes: tuple[int, ...]  # the classes its training cases annotate


def stage_dir(work: Path, name: str) -> Path:
    return Path(work) / "stages" / name


def read_state(work: Path, name: str) -> dict[str, Any] | None:
    path = stage_dir(work, name) / STATE
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def write_json(path: Path, value: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(value, indent=1, default=str) + "\n")


# -- the dataset ------------------------------------------------------------------------------------
def resampled_label(label: Path, image: Path, out: Path, hashes: FileHashes) -> Path:
    """``label`` resampled onto ``image``'s grid (nearest neighbour, physical space), kept in ``out``."""
    import SimpleITK as sitk

    from ..evaluate import _resample_onto
    from ..io import read_image

    key = digest([hashes(label), hashes(image)])
    stamp = out.with_suffix("").with_suffix(".key")
    if out.is_file() and stamp.is_file() and stamp.read_text() == key:
        return out
    onto = _resample_onto(read_image(label), read_image(image))
    with atomic_path(out) as tmp:
        sitk.WriteImage(onto, str(tmp), useCompression=True)
    stamp.write_text(key)
    log.info("%s resampled onto the grid of %s: %s", label, image, out)
    return out


def dataset_index(definition: PipelineDefinition, dataset: Path, work: Path, hashes: FileHashes,
                  hold_out: tuple[str, ...] = (), progress: bool = True,
                  check: Callable[[Any], None] | None = None):
    """The dataset index with the dataset's own annotations (cached in ``work/inputs``), held-out cases
    removed. ``check`` (e.g. that the stages have cases) sees it before a newly built index is cached."""
    from ..train.dataset import (CaseSource, DatasetIndex, discover, index_cases, read_annotations,
                                 save_index)

    spec, inputs = definition.dataset, Path(work) / "inputs"
    if spec.cases:
        sources, declared = [], {}
        for c in spec.cases:
            image = dataset / c.image
            label = dataset / c.label if c.label else None
            for p in (image, label):
                if p is not None and not p.exists():
                    raise InputImageError(f"{p}: case {c.id!r} of the definition's dataset not found (paths are "
                                          f"relative to --dataset {dataset})")
            if label is not None and c.resample_label:
                label = resampled_label(label, image, inputs / "labels" / f"{c.id}.nii.gz", hashes)
            sources.append(CaseSource(c.id, str(image.resolve()), None if label is None else str(label.resolve())))
            if c.annotated is not None:
                declared[c.id] = c.annotated
        layout = "pairs"
    else:
        layout, sources = discover(dataset, spec.images, spec.labels, spec.unlabelled)
        declared = dict(read_annotations(dataset / spec.annotations)) if spec.annotations else {}
    key = digest({"spec": [(s.id, s.image, hashes(s.image), s.label, hashes(s.label)) for s in sources],
                  "declared": {k: list(v) for k, v in declared.items()}, "layout": layout})
    path, stamp = inputs / "index.json", inputs / "index.key"
    cached = path.is_file() and stamp.is_file() and stamp.read_text() == key
    if cached:
        index = DatasetIndex.from_json(path.read_text(), str(path))
    else:
        index = index_cases(sources, layout, str(Path(dataset).resolve()), declared, progress=progress)
    unknown = sorted(set(hold_out) - {c.id for c in index.cases})
    if unknown:
        raise ConfigError(f"--hold-out names cases that are not in the dataset: {unknown}; cases: "
                          f"{[c.id for c in index.cases][:10]}")
    kept = replace(index, cases=tuple(c for c in index.cases if c.id not in hold_out))
    if check is not None:
        check(kept)
    if not cached:
        save_index(index, path)
        with atomic_path(stamp) as tmp:
            tmp.write_text(key)
    return kept


def check_stages_have_cases(definition: PipelineDefinition, index, sets: dict[str, tuple[str, ...]]) -> None:
    """:class:`ConfigError` for what would stop a run at a required stage whatever the earlier stages produce:
    an empty case set, or training cases without a label that no pseudo-label step (of it or before it)
    covers. Checked before the run writes anything, so a dataset that cannot work fails at once."""
    may_be_labelled = {c.id for c in index.cases if c.labelled}
    for stage in definition.stages:
        for step in stage.pseudo_label:
            may_be_labelled.update(stage_cases(sets, step.cases))
        if stage.optional:
            continue
        reason = empty_sets_reason(definition, stage, sets, len(index.cases))
        if reason:
            raise ConfigError(f"{reason}; fix the definition or the dataset (or mark the stage optional)")
        unlabelled = [i for i in stage_cases(sets, stage.train) if i not in may_be_labelled]
        if unlabelled:
            raise ConfigError(f"stage {stage.name!r} trains on unlabelled cases {unlabelled[:5]} that no pseudo-label "
                              "step labels; add one (e.g. {\"model\": <earlier stage>, \"cases\": [...]})")


# -- running ----------------------------------------------------------------------------------------
class PipelineRun:
    """The state of one run over the stages (thin: the work is in :func:`run_stage`)."""

    def __init__(self, definition: PipelineDefinition, dataset: Path, work: Path, options: RunOptions,
                 epoch_hook: EpochHook | None = None):
        self.definition, self.options = definition, options
        self.dataset, self.work = Path(dataset).resolve(), Path(work).resolve()
        self.epoch_hook = epoch_hook
        # What can refuse the run does so before anything is written: the work folder, each stage's training
        # config with this run's overrides, the dataset and the stages' case sets on it.
        check_writable(self.work)
        for s in definition.stages:
            stage_config(definition, s, self.work / "index.json", self.work / "train", None, options.train_overrides())
        sets: dict[str, tuple[str, ...]] = {}

        def check(index) -> None:
            sets.update(select_case_sets(definition, index))
            check_stages_have_cases(definition, index, sets)

        made = _first_missing(self.work / "inputs")
        try:
            self.hashes = FileHashes(self.work / "hashes.json")
            self.index = dataset_index(definition, self.dataset, self.work, self.hashes, options.hold_out,
                                       options.progress, check)
        except BaseException:
            if made is not None:  # e.g. labels resampled before the dataset was refused: leave no trace
                shutil.rmtree(made, ignore_errors=True)
            raise
        self.sets = sets
        self.labels = {c.id: CaseLabel(c.label, self.hashes(c.label), c.annotated, "dataset")
                       for c in self.index.cases}
        self.images = {c.id: self.hashes(c.image) for c in self.index.cases}
        self.models: dict[str, StageModel] = {}
        self.ran: list[str] = []  # stages with a model, in order
        for name, ids in self.sets.items():
            log.info("case set %s: %d case(s) %s", name, len(ids), list(ids)[:8])

    def model_for(self, name: str) -> StageModel | None:
        """The model of stage ``name``; for a skipped stage, that of the nearest earlier stage that ran."""
        names = [s.name for s in self.definition.stages]
        for earlier in reversed(names[: names.index(name) + 1]):
            if earlier in self.models:
                return self.models[earlier]
        return None

    def run(self) -> dict[str, Any]:
        t0 = time.time()
        write_json(self.work / "definition.json", self.definition.to_dict())
        summary = {"definition": self.definition.name, "dataset": str(self.dataset),
                   "hold_out": list(self.options.hold_out), "case_sets": {k: list(v) for k, v in self.sets.items()},
                   "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        try:  # a continued run keeps its first start
            before = json.loads((self.work / "run.json").read_text())
            if {k: before.get(k) for k in ("definition", "dataset", "hold_out")} == \
                    {k: summary[k] for k in ("definition", "dataset", "hold_out")}:
                summary["started"] = before.get("started", summary["started"])
        except (OSError, json.JSONDecodeError):
            pass
        write_json(self.work / "run.json", summary)
        from .report import write_report

        try:
            for stage in self.definition.stages:
                run_stage(self, stage)
                write_report(self.work)
        finally:
            self.hashes.save()
        if not self.ran:
            raise ConfigError(f"pipeline {self.definition.name!r}: every stage was skipped; nothing was trained")
        final = self.models[self.ran[-1]]
        shutil.copyfile(final.bundle, self.work / "model.onnx")
        summary.update(finished=time.strftime("%Y-%m-%d %H:%M:%S"), seconds_this_call=round(time.time() - t0, 1),
                       final_stage=final.stage, model=str(self.work / "model.onnx"), model_sha256=final.sha256)
        write_json(self.work / "run.json", summary)
        write_report(self.work)
        log.info("pipeline %s finished: the %s model is %s (sha256 %s)", self.definition.name, final.stage,
                 self.work / "model.onnx", final.sha256[:12])
        return summary


def _first_missing(path: Path) -> Path | None:
    """The outermost of ``path`` and its parents that does not exist yet (None: ``path`` exists)."""
    missing = None
    for p in (path, *path.parents):
        if p.exists():
            break
        missing = p
    return missing


def run_pipeline(definition: PipelineDefinition, dataset: str | Path, work: str | Path,
                 options: RunOptions = RunOptions(), epoch_hook: EpochHook | None = None) -> dict[str, Any]:
    """Run (or continue) ``definition`` on ``dataset`` in ``work``; returns the run summary."""
    return PipelineRun(definition, Path(dataset), Path(work), options, epoch_hook).run()


def _cannot(run: PipelineRun, stage: StageDef, reason: str, state: dict[str, Any]) -> bool:
    """Skip an optional stage (True) or stop with ``reason``."""
    if not stage.optional:
        raise ConfigError(f"{reason}; fix the definition or mark the stage optional")
    log.warning("skipping optional %s", reason[0].lower() + reason[1:])
    state.update(status="skipped", reason=reason)
    write_json(stage_dir(run.work, stage.name) / STATE, state)
    return True


def plan_jobs(run: PipelineRun, stage: StageDef, labels: dict[str, CaseLabel]) -> tuple[list, str | None]:
    """The pseudo-label steps of ``stage`` as ``[(spec, jobs)]``, updating ``labels`` to what they will
    produce; or a reason why they cannot run."""
    out_dir = stage_dir(run.work, stage.name)
    steps = []
    for k, step in enumerate(stage.pseudo_label):
        model = run.model_for(step.model)
        if model is None:
            return [], f"stage {stage.name!r}: pseudo-label step {k + 1} needs the model of {step.model!r}, and " \
                       "no stage up to it produced one"
        if model.stage != step.model:
            log.info("stage %s: %s was skipped; its model is that of %s", stage.name, step.model, model.stage)
        if step.classes is not None and not set(step.classes) <= set(model.classes):
            return [], (f"stage {stage.name!r}: pseudo-label step {k + 1} asks the {model.stage} model for classes "
                        f"{sorted(set(step.classes) - set(model.classes))}, which its training cases did not "
                        f"annotate (it knows {list(model.classes)})")
        spec = LabellerSpec(model.bundle, model.sha256, model.stage, run.options.backend, run.options.device,
                            run.options.threads, step.mode, step.tta, step.confidence_threshold)
        setting = {"model": model.sha256, "mode": step.mode, "tta": step.tta,
                   "threshold": step.confidence_threshold}
        jobs = []
        for case in stage_cases(run.sets, step.cases):
            cur = labels[case]
            fill = classes_to_fill(cur.annotated, step.classes or ALL_CLASSES, model.classes)
            if not fill:
                log.info("stage %s: %s annotates every class the %s model could add; left as it is", stage.name,
                         case, model.stage)
                continue
            entry = run.index.case(case)
            key = digest({**setting, "image": run.images[case], "annotation": cur.identity,
                          "annotated": list(cur.annotated), "fill": list(fill), "step": k})
            name = case if len(stage.pseudo_label) == 1 else f"{case}.step{k + 1}"  # steps chain per case
            jobs.append(LabelJob(case, entry.image, run.images[case], cur.label, cur.identity, cur.annotated, fill,
                                 str(out_dir / "labels" / f"{name}.nii.gz"), str(out_dir / "labels" / f"{name}.json"),
                                 str(out_dir / "confidence" / f"{name}.nii.gz") if step.confidence_threshold else None,
                                 key))
            labels[case] = CaseLabel(jobs[-1].out_label, f"job:{key}",
                                     tuple(sorted(set(cur.annotated) | set(fill) | {0})), stage.name)
        steps.append((spec, jobs))
    return steps, None


def run_stage(run: PipelineRun, stage: StageDef) -> None:
    """Skip, resume or run one stage; afterwards ``run.labels`` and ``run.models`` include its results."""
    from ..train import train
    from ..train.prepare import prepare

    folder = stage_dir(run.work, stage.name)
    folder.mkdir(parents=True, exist_ok=True)
    state: dict[str, Any] = {"stage": stage.name, "optional": stage.optional}
    reason = empty_sets_reason(run.definition, stage, run.sets, len(run.index.cases))
    if reason and _cannot(run, stage, reason, state):
        return
    labels = dict(run.labels)
    steps, reason = plan_jobs(run, stage, labels)
    if reason and _cannot(run, stage, reason, state):
        return
    train_ids = stage_cases(run.sets, stage.train)
    unlabelled = [i for i in train_ids if labels[i].label is None]
    if unlabelled:
        raise ConfigError(f"stage {stage.name!r} trains on unlabelled cases {unlabelled[:5]} that no pseudo-label "
                          "step of it labels; add one (e.g. {\"model\": <earlier stage>, \"cases\": [...]})")
    init = run.model_for(stage.init) if stage.init else None
    if stage.init and init is None:
        raise ConfigError(f"stage {stage.name!r}: init {stage.init!r} has no model (no stage up to it ran)")
    config = stage_config(run.definition, stage, folder / "index.json", folder / "train",
                          Path(init.checkpoint) if init else None, run.options.train_overrides())
    inputs = {"stage": {k: v for k, v in stage.to_dict().items() if k != "description"},
              "defaults": dict(run.definition.defaults), "config": config_binding(config),
              "init": init.sha256 if init else None, "jobs": [j.key for _, jobs in steps for j in jobs],
              "cases": [[i, run.images[i], labels[i].identity, list(labels[i].annotated)] for i in train_ids]}
    key = digest(inputs)
    old = read_state(run.work, stage.name) or {}
    bundle = folder / "train" / "model.onnx"
    if old.get("status") == "done" and old.get("hash") == key and bundle.is_file() \
            and run.hashes(bundle) == old.get("model_sha256"):
        log.info("stage %s: up to date (hash %s); skipped", stage.name, key[:12])
        _register(run, stage, labels, old)
        return
    if old.get("hash") not in (None, key):
        log.info("stage %s: its inputs changed since the last run; starting it over", stage.name)
        shutil.rmtree(folder)
        folder.mkdir(parents=True)
    elif old.get("status") == "running":
        log.info("stage %s: resuming an interrupted run", stage.name)
    state.update(status="running", hash=key, started=old.get("started") or time.strftime("%Y-%m-%d %H:%M:%S"),
                 model=stage.model, budget=stage.to_dict()["budget"])
    write_json(folder / STATE, state)

    pseudo: dict[str, dict] = {}
    for spec, jobs in steps:
        if jobs:
            pseudo.update(label_cases(jobs, spec, run.options.fan, run.options.progress))
    index = stage_index(run, train_ids, labels, pseudo)
    from ..train.dataset import save_index

    save_index(index, folder / "index.json")
    prepared = prepare(config, progress=run.options.progress)
    hook = run.epoch_hook
    callbacks = [] if hook is None else [lambda record: hook(stage.name, record)]
    result = train(config, resume=True, callbacks=callbacks, prepared=prepared)
    if not run.options.keep_caches:
        shutil.rmtree(prepared.cache_dir, ignore_errors=True)
    last = result.history[-1]
    trained = sorted({k for i in prepared.train_ids for k in index.case(i).annotated} - {0})
    state.update(
        status="done", finished=time.strftime("%Y-%m-%d %H:%M:%S"),
        train_cases=list(prepared.train_ids), val_cases=list(prepared.val_ids),
        validation_on_training_cases=set(prepared.val_ids) <= set(prepared.train_ids),
        pseudo_labelled={c: {"from": m["model"]["stage"], "asked": m["pseudo_labelled"]["classes"],
                             "classes": [int(k) for k, n in m["pseudo_labelled"]["voxels"].items() if n],
                             "ignored": m["ignored"]["voxels"], "sidecar": str(Path(m["label"]).with_suffix("")
                                                                                   .with_suffix(".json"))}
                         for c, m in pseudo.items()},
        pseudo_seconds=round(sum(m["seconds"] for m in pseudo.values()), 1),
        train_seconds=round(sum(r.seconds for r in result.history), 1),
        iterations=config.schedule.epochs * config.schedule.iterations_per_epoch,
        batch_size=config.schedule.batch_size, final_train_loss=last.train_loss, final_val_loss=last.val_loss,
        val_dice={str(k): d for k, d in enumerate(last.val_dice) if k > 0},
        classes=trained, init=init.stage if init else None,
        model_path=str(result.bundle.relative_to(run.work)), model_sha256=run.hashes(result.bundle),
        checkpoint=str(result.checkpoint.relative_to(run.work)))
    write_json(folder / STATE, state)
    _register(run, stage, labels, state)


def stage_index(run: PipelineRun, train_ids, labels: dict[str, CaseLabel], pseudo: dict[str, dict]):
    """The training index of a stage: its cases with their current labels and annotated classes."""
    entries = []
    for case in train_ids:
        entry, cur = run.index.case(case), labels[case]
        if cur.source == "dataset":
            entries.append(entry)
            continue
        meta = pseudo.get(case) or json.loads(Path(cur.label).with_suffix("").with_suffix(".json").read_text())
        present = tuple(v for v in meta["present"] if v != IGNORE_ID)
        entries.append(replace(entry, label=cur.label, present=present, annotated=cur.annotated,
                               annotated_source=f"pseudo-labels of stage {cur.source}"))
    return replace(run.index, cases=tuple(entries))


def _register(run: PipelineRun, stage: StageDef, labels: dict[str, CaseLabel], state: dict[str, Any]) -> None:
    run.labels = labels
    run.models[stage.name] = StageModel(stage.name, str(run.work / state["model_path"]), state["model_sha256"],
                                        str(run.work / state["checkpoint"]), tuple(state["classes"]))
    run.ran.append(stage.name)
