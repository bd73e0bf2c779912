"""Pseudo-labelling through the inference runtime: a model is loaded once per worker and the cases stream
through it; each case's prediction is merged into its annotation (:mod:`flare_rt.stages.merge`) and
written with a JSON sidecar that says which model produced which classes.

One code path: :class:`Labeller` labels one case. :func:`label_cases` runs it in this process, or fans
the cases out over a Ray cluster with one :class:`Labeller` actor per GPU (or per CPU worker), Ray doing
the scheduling (``pip install 'flare-rt[cluster]'``). Workers write their outputs themselves, so on
several machines the work folder must be on a shared file system.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_path
from ..errors import BackendUnavailableError, FlareError
from ..labels import NAMES
from .merge import merge_pseudo_labels

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LabellerSpec:
    """The model and how it runs (the same in every worker)."""

    bundle: str
    bundle_sha256: str
    stage: str  # the stage that trained it
    backend: str = "auto"
    device: str = "auto"
    threads: int | None = None
    mode: str = "fast"
    tta: bool | None = None
    confidence_threshold: float | None = None


@dataclass(frozen=True)
class LabelJob:
    """One case to pseudo-label."""

    case: str
    image: str
    image_sha256: str
    annotation: str | None  # the case's current label map (None: unlabelled)
    annotation_sha256: str | None
    annotated: tuple[int, ...]
    fill: tuple[int, ...]  # classes to take from the model
    out_label: str
    out_sidecar: str
    out_confidence: str | None  # where the confidence map goes (with a threshold)
    key: str  # content hash of everything the output depends on


def read_sidecar(path: str | Path) -> dict[str, Any] | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def finished(job: LabelJob) -> dict[str, Any] | None:
    """The sidecar of a job done earlier with the same inputs (its label file present), else None."""
    meta = read_sidecar(job.out_sidecar)
    if meta and meta.get("key") == job.key and Path(job.out_label).is_file():
        return meta
    return None


class Labeller:
    """A loaded model that pseudo-labels cases: load once, call for each :class:`LabelJob`."""

    def __init__(self, spec: LabellerSpec):
        from ..backends import create_backend
        from ..bundle import Bundle
        from ..pipeline import SegmentOptions, Segmenter

        self.spec = spec
        bundle = Bundle.load(spec.bundle)
        backend = create_backend(bundle, spec.backend, spec.device, spec.threads)
        options = SegmentOptions(mode=spec.mode, tta=spec.tta, confidence=spec.confidence_threshold is not None)
        self.segmenter = Segmenter(bundle, backend, options)
        self.backend_name = backend.describe()

    def __call__(self, job: LabelJob) -> dict[str, Any]:
        from ..io import load_volume, write_labels
        from ..train.dataset import grid_image, read_label

        t0 = time.perf_counter()
        volume = load_volume(job.image)
        pred = self.segmenter.predict(volume)
        annotation = None
        if job.annotation is not None:
            g = volume.geometry
            annotation = read_label(job.annotation, grid_image(volume.array.shape, g.spacing, g.origin, g.direction))
        merged = merge_pseudo_labels(annotation, job.annotated, pred.labels, job.fill, pred.confidence,
                                     self.spec.confidence_threshold)
        write_labels(merged.labels, volume.geometry, job.out_label)
        if job.out_confidence is not None and pred.confidence is not None:
            write_labels(pred.confidence, volume.geometry, job.out_confidence)
        sources = {str(k): "annotation" for k in job.annotated if k}
        sources.update({str(k): f"{self.spec.stage} model {self.spec.bundle_sha256[:12]}" for k in merged.filled})
        meta = {
            "case": job.case, "key": job.key, "label": job.out_label,
            "image": job.image, "image_sha256": job.image_sha256,
            "annotation": {"file": job.annotation, "sha256": job.annotation_sha256,
                           "classes": [k for k in job.annotated if k]},
            "model": {"stage": self.spec.stage, "bundle": self.spec.bundle, "sha256": self.spec.bundle_sha256,
                      "backend": self.backend_name, "mode": self.spec.mode},
            "pseudo_labelled": {"classes": sorted(merged.filled), "voxels": {str(k): v for k, v in merged.filled.items()}},
            "annotated": list(merged.annotated),
            "class_sources": {NAMES[int(k)]: v for k, v in sorted(sources.items(), key=lambda kv: int(kv[0]))},
            "ignored": {"threshold": self.spec.confidence_threshold, "voxels": merged.ignored,
                        "confidence_map": job.out_confidence},
            "present": [int(v) for v in np.unique(merged.labels)],
            "seconds": round(time.perf_counter() - t0, 3),
        }
        with atomic_path(job.out_sidecar) as tmp:
            tmp.write_text(json.dumps(meta, indent=1) + "\n")
        log.info("%s: pseudo-labelled %s with the %s model (%d ignored voxels) in %.1fs", job.case,
                 [NAMES[k] for k in sorted(merged.filled)], self.spec.stage, merged.ignored, meta["seconds"])
        return meta

    def label(self, job: LabelJob) -> dict[str, Any]:
        """``self(job)``, or ``{"case", "error"}`` when the case fails with a FlareError (bad input): the
        other cases go on (this is the method Ray actors run)."""
        try:
            return self(job)
        except FlareError as exc:
            log.error("%s: %s", job.case, exc)
            return {"case": job.case, "error": str(exc)}


@dataclass(frozen=True)
class FanOut:
    """How to spread pseudo-labelling: in this process (``ray`` None), or over Ray: ``"local"`` starts a
    local instance with ``workers`` CPUs, anything else is a cluster address (``"auto"``: the running
    cluster). Actors: one per GPU when the device is (or resolves to) CUDA, else ``workers``."""

    workers: int = 1
    ray: str | None = None


def _labelled_locally(jobs: Sequence[LabelJob], spec: LabellerSpec, progress: bool) -> Iterator[dict]:
    from tqdm import tqdm

    labeller = Labeller(spec)
    for job in tqdm(jobs, desc=f"pseudo-label ({spec.stage} model)", unit="case", disable=not progress, leave=False):
        yield labeller.label(job)


def ray_runtime_env() -> dict[str, Any]:
    """Workers of a local Ray instance import this flare-rt (a source checkout included)."""
    import os

    root = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    return {"env_vars": {"PYTHONPATH": path}}


def start_ray(address: str, num_cpus: int):
    """``ray.init`` for :class:`FanOut`: a local instance (``address == "local"``) or a cluster."""
    try:
        import ray
    except ImportError as exc:
        raise BackendUnavailableError("pseudo-labelling over Ray needs Ray: pip install 'flare-rt[cluster]'") from exc
    if address == "local":
        ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env=ray_runtime_env(), log_to_driver=False)
    else:
        ray.init(address=address, runtime_env=ray_runtime_env(), log_to_driver=False)
    return ray


def _labelled_by_ray(jobs: Sequence[LabelJob], spec: LabellerSpec, fan: FanOut, progress: bool) -> Iterator[dict]:
    try:
        import ray
        from ray.util import ActorPool
    except ImportError as exc:
        raise BackendUnavailableError("pseudo-labelling over Ray needs Ray: pip install 'flare-rt[cluster]'") from exc
    started = not ray.is_initialized()
    if started:
        start_ray(fan.ray or "local", fan.workers)
    actors = []
    try:
        gpus = int(ray.cluster_resources().get("GPU", 0))
        use_gpu = spec.device == "cuda" or (spec.device == "auto" and gpus > 0)
        if use_gpu:
            resources, n = {"num_gpus": 1}, max(gpus, 1)
        else:
            resources, n = {"num_cpus": spec.threads or 1}, fan.workers
        remote = ray.remote(**resources)(Labeller)
        actors = [remote.remote(spec) for _ in range(max(1, min(n, len(jobs))))]
        log.info("pseudo-labelling %d cases with %d Ray actor(s) (%s each)", len(jobs), len(actors), resources)
        pool = ActorPool(actors)
        from tqdm import tqdm

        with tqdm(total=len(jobs), desc=f"pseudo-label ({spec.stage} model, Ray)", unit="case",
                  disable=not progress, leave=False) as bar:
            for meta in pool.map_unordered(lambda actor, job: actor.label.remote(job), list(jobs)):
                bar.update()
                yield meta
    finally:
        for actor in actors:
            ray.kill(actor)
        if started:
            ray.shutdown()


def label_cases(jobs: Sequence[LabelJob], spec: LabellerSpec, fan: FanOut = FanOut(),
                progress: bool = True) -> dict[str, dict[str, Any]]:
    """Pseudo-label ``jobs``; returns ``{case: sidecar}``. Jobs already done with the same inputs are not
    redone (an interrupted stage resumes here). A failing case does not stop the others; the failures
    are raised together at the end."""
    done = {j.case: meta for j in jobs if (meta := finished(j)) is not None}
    todo = [j for j in jobs if j.case not in done]
    if done:
        log.info("pseudo-labels of %d of %d cases are up to date", len(done), len(jobs))
    if not todo:
        return done
    runs = _labelled_locally(todo, spec, progress) if fan.ray is None else _labelled_by_ray(todo, spec, fan, progress)
    failures = []
    for meta in runs:
        if "error" in meta:
            failures.append(f"{meta['case']}: {meta['error']}")
        else:
            done[meta["case"]] = meta
    if failures:
        raise FlareError(f"pseudo-labelling with the {spec.stage} model failed for {len(failures)} case(s) (the "
                         f"others are done; rerun after fixing them): {'; '.join(failures[:3])}")
    return done
