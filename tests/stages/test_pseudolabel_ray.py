"""Pseudo-labelling through the runtime, in this process and fanned out over a local Ray instance with two
CPU workers: the same label arrays, confidence maps, geometry and provenance (one thread per worker)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from flare_rt.labels import IGNORE_ID
from flare_rt.resources import packaged_model
from flare_rt.stages.hashing import FileHashes
from flare_rt.stages.pseudolabel import FanOut, LabelJob, LabellerSpec, label_cases
from flare_rt.train.dataset import build_index

pytest.importorskip("ray")


def jobs_for(dataset: Path, out: Path) -> list[LabelJob]:
    index, hashes = build_index(dataset, progress=False), FileHashes()
    jobs = []
    for c in index.cases:
        jobs.append(LabelJob(c.id, c.image, hashes(c.image), c.label, hashes(c.label), c.annotated,
                             tuple(k for k in range(1, 14) if k not in c.annotated),
                             str(out / f"{c.id}.nii.gz"), str(out / f"{c.id}.json"), str(out / f"{c.id}_conf.nii.gz"),
                             key=f"test-{c.id}"))
    return jobs


def read(path: str):
    img = sitk.ReadImage(path)
    return sitk.GetArrayFromImage(img), (img.GetSpacing(), img.GetOrigin(), img.GetDirection())


def test_ray_and_one_process_give_the_same_pseudo_labels(dataset, tmp_path):
    bundle = packaged_model()
    spec = LabellerSpec(str(bundle), FileHashes()(bundle), "demo", backend="onnxruntime", device="cpu", threads=1,
                        confidence_threshold=0.6)
    local_jobs, ray_jobs = jobs_for(dataset, tmp_path / "local"), jobs_for(dataset, tmp_path / "ray")
    local = label_cases(local_jobs, spec, FanOut(), progress=False)
    fanned = label_cases(ray_jobs, spec, FanOut(workers=2, ray="local"), progress=False)
    assert sorted(local) == sorted(fanned) == ["case_00", "case_01", "case_02", "case_03"]
    filled = 0
    for a, b in zip(local_jobs, ray_jobs):
        (la, ga), (lb, gb) = read(a.out_label), read(b.out_label)
        assert np.array_equal(la, lb) and ga == gb
        assert ga == read(a.image)[1]  # on the image's grid
        assert np.array_equal(read(a.out_confidence)[0], read(b.out_confidence)[0])
        ma, mb = (json.loads(Path(j.out_sidecar).read_text()) for j in (a, b))
        for m in (ma, mb):
            for key in ("seconds", "label"):
                m.pop(key)
            m["ignored"].pop("confidence_map")
        assert ma == mb
        assert ma["model"]["sha256"] == spec.bundle_sha256 and ma["annotation"]["file"] == a.annotation
        if a.annotation is not None:  # annotated voxels kept
            original = sitk.GetArrayFromImage(sitk.ReadImage(a.annotation))
            assert np.array_equal(la[original > 0], original[original > 0])
        filled += sum(ma["pseudo_labelled"]["voxels"].values())
        assert ma["ignored"]["voxels"] == int((la == IGNORE_ID).sum())
    assert filled > 0  # the model did fill something: the comparison is not between empty maps
    # a second call finds every case done (same keys) and labels nothing
    again = label_cases(ray_jobs, spec, FanOut(workers=2, ray="local"), progress=False)
    assert {k: v["seconds"] for k, v in again.items()} == {k: v["seconds"] for k, v in fanned.items()}
