"""The pipeline end to end on generated cases with the tiny network: stages in order, pseudo-labels merged
with provenance, an optional stage skipped, a finished run skipped on re-run, an interrupted stage resumed
from its checkpoint, a changed stage (and only what depends on it) run again, and the report."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

import flare_rt.train
from flare_rt.cli import main as cli_main
from flare_rt.errors import ConfigError
from flare_rt.labels import IGNORE_ID
from flare_rt.stages import runner
from flare_rt.stages.definition import definition_from_dict
from flare_rt.stages.runner import RunOptions, read_state, run_pipeline

OPTIONS = RunOptions(threads=1, progress=False)


def definition(tmp: Path, s4_epochs: int = 1) -> dict:
    return {
        "name": "t",
        "defaults": {"overrides": {"runtime.num_workers": 0, "schedule.val_iterations": 1, "schedule.checkpoint_every": 1,
                                   "data.val_fraction": 0, "data.preprocess_workers": 1,
                                   "optim.lr": 0.1, "optim.momentum": 0.9}},
        "case_sets": {"full": {"labelled": True, "annotates_all": [1, 2, 3, 5]},
                      "tumour": {"annotates_exactly": [1, 2, 3, 4, 13, 14]},
                      "partial": {"labelled": True, "exclude": ["full", "tumour"]},
                      "unlabelled": {"labelled": False}},
        "stages": [
            {"name": "s1", "model": "tiny", "train": ["full"], "budget": {"epochs": 1, "iterations_per_epoch": 6}},
            {"name": "s2", "model": "tiny", "init": "s1", "train": ["full", "partial"],
             "budget": {"epochs": 2, "iterations_per_epoch": 2},
             "pseudo_label": [{"model": "s1", "cases": ["partial"], "classes": "missing"}]},
            {"name": "s3", "model": "tiny", "optional": True, "train": ["tumour"],
             "pseudo_label": [{"model": "s2", "cases": ["tumour"]}]},
            {"name": "s4", "model": "tiny", "train": ["full", "partial", "unlabelled"],
             "budget": {"epochs": s4_epochs, "iterations_per_epoch": 2},
             "pseudo_label": [{"model": "s3", "cases": ["unlabelled"], "confidence_threshold": 0.6}]}]}


def load(tmp: Path, **kw):
    return definition_from_dict(definition(tmp, **kw), tmp)


def array(path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


class Interrupted(RuntimeError):
    pass


@pytest.fixture(scope="module")
def finished(dataset, tmp_path_factory):
    work = tmp_path_factory.mktemp("work")
    summary = run_pipeline(load(work), dataset, work, OPTIONS)
    return work, summary


def test_stages_run_in_order_with_merged_pseudo_labels_and_provenance(finished, dataset):
    work, summary = finished
    states = {s: read_state(work, s) for s in ("s1", "s2", "s3", "s4")}
    assert [states[s]["status"] for s in ("s1", "s2", "s3", "s4")] == ["done", "done", "skipped", "done"]
    assert "'s3'" in states["s3"]["reason"] and "tumour" in states["s3"]["reason"]
    assert states["s1"]["train_cases"] == ["case_00", "case_01"] and states["s1"]["classes"] == [1, 2, 3, 5]
    assert states["s2"]["init"] == "s1" and states["s4"]["train_cases"] == ["case_00", "case_01", "case_02", "case_03"]
    assert summary["final_stage"] == "s4" and Path(summary["model"]).read_bytes() == \
        (work / states["s4"]["model_path"]).read_bytes()

    # case_02 annotates liver and spleen: the s1 model filled right kidney and aorta, nothing else changed
    meta = json.loads((work / "stages/s2/labels/case_02.json").read_text())
    assert meta["model"]["stage"] == "s1" and meta["model"]["sha256"] == states["s1"]["model_sha256"]
    assert meta["annotation"]["classes"] == [1, 3] and meta["pseudo_labelled"]["classes"] == [2, 5]
    assert meta["annotated"] == [0, 1, 2, 3, 5]
    assert meta["class_sources"]["liver"] == "annotation" and meta["class_sources"]["aorta"].startswith("s1 model")
    original, merged = array(dataset / "labelsTr/case_02.nii.gz"), array(work / "stages/s2/labels/case_02.nii.gz")
    assert np.array_equal(merged[original > 0], original[original > 0])
    assert set(np.unique(merged[merged != original]).tolist()) <= {2, 5}
    index = json.loads((work / "stages/s2/index.json").read_text())
    case02 = next(c for c in index["cases"] if c["id"] == "case_02")
    assert case02["annotated"] == [0, 1, 2, 3, 5] and case02["label"].endswith("stages/s2/labels/case_02.nii.gz")

    # the unlabelled case: s3 was skipped, so its model is s2's; low-confidence voxels are ignored
    meta = json.loads((work / "stages/s4/labels/case_03.json").read_text())
    assert meta["model"]["stage"] == "s2" and meta["annotation"]["file"] is None
    assert meta["pseudo_labelled"]["classes"] == [1, 2, 3, 5] and meta["annotated"] == [0, 1, 2, 3, 5]
    conf = array(work / "stages/s4/confidence/case_03.nii.gz")
    labels = array(work / "stages/s4/labels/case_03.nii.gz")
    assert np.array_equal(labels == IGNORE_ID, conf < 153) and meta["ignored"]["voxels"] == int((conf < 153).sum())

    report = (work / "report.md").read_text()
    assert "| s2 | done | tiny (from s1) |" in report and "skipped" in report and (work / "report.png").is_file()
    assert "case_03 <- the s2 model filled " in report and "(asked for 4 classes)" in report


def test_a_second_run_skips_every_finished_stage(finished, dataset, monkeypatch):
    work, _ = finished

    def boom(*a, **k):
        raise AssertionError("nothing should run again")

    monkeypatch.setattr(flare_rt.train, "train", boom)
    monkeypatch.setattr(runner, "label_cases", boom)
    assert run_pipeline(load(work), dataset, work, OPTIONS)["final_stage"] == "s4"


def test_status_command(finished, capfd):
    work, _ = finished
    assert cli_main(["pipeline", "status", "--work", str(work)]) == 0
    out = capfd.readouterr().out
    assert "finished" in out and "s3" in out and "skipped" in out and "4 training cases, 1 pseudo-labelled" in out


def test_an_interrupted_stage_resumes_and_a_changed_stage_reruns_alone(finished, dataset, tmp_path, monkeypatch):
    reference, _ = finished
    work = tmp_path / "work"

    def interrupt(stage, record):
        if stage == "s2" and record.epoch == 1:
            raise Interrupted("power cut")

    with pytest.raises(Interrupted):
        run_pipeline(load(work), dataset, work, OPTIONS, epoch_hook=interrupt)
    assert read_state(work, "s1")["status"] == "done" and read_state(work, "s2")["status"] == "running"
    first_epoch = (work / "stages/s2/train/progress.csv").read_text().splitlines()[1]
    sidecar = (work / "stages/s2/labels/case_02.json").stat().st_mtime_ns
    s1_model = (work / "stages/s1/train/model.onnx").stat().st_mtime_ns

    run_pipeline(load(work), dataset, work, OPTIONS)
    s2 = read_state(work, "s2")
    assert s2["status"] == "done" and (work / "stages/s1/train/model.onnx").stat().st_mtime_ns == s1_model
    assert (work / "stages/s2/labels/case_02.json").stat().st_mtime_ns == sidecar  # pseudo-labels kept
    lines = (work / "stages/s2/train/progress.csv").read_text().splitlines()
    assert len(lines) == 3 and lines[1] == first_epoch  # epoch 1 from the checkpoint, epoch 2 trained now
    # the same inputs as the uninterrupted run in another folder: the same hash and the same training
    assert read_state(work, "s1")["hash"] == read_state(reference, "s1")["hash"]
    assert s2["final_train_loss"] == read_state(reference, "s2")["final_train_loss"]

    # a longer budget for s4 changes s4 only
    ran, before = [], read_state(work, "s4")["hash"]
    original_train = flare_rt.train.train
    monkeypatch.setattr(flare_rt.train, "train", lambda config, **kw: ran.append(config.name) or original_train(config, **kw))
    run_pipeline(load(work, s4_epochs=2), dataset, work, OPTIONS)
    assert ran == ["t-s4"] and read_state(work, "s4")["hash"] != before
    assert len((work / "stages/s4/train/progress.csv").read_text().splitlines()) == 3  # started over: 2 epochs


def test_an_empty_stage_stops_with_its_name_and_selector(dataset, tmp_path, capfd):
    d = definition(tmp_path)
    d["stages"][2]["optional"] = False
    defn = definition_from_dict(d, tmp_path)
    # refused when the run is set up, before any stage runs or anything is written
    with pytest.raises(ConfigError, match=r"stage 's3': its training set is empty: case set\(s\) tumour "
                                          r"\{\"annotates_exactly\": \[1, 2, 3, 4, 13, 14\]\} select none of the 4 cases"
                                          r".*mark the stage optional"):
        runner.PipelineRun(defn, dataset, tmp_path / "w", RunOptions(progress=False))
    assert not (tmp_path / "w").exists()
    # holding out the partially labelled case empties s2's pseudo-label step
    with pytest.raises(ConfigError, match=r"stage 's2': its pseudo-label step 1 \(s1\) is empty: case set\(s\) partial"):
        runner.PipelineRun(defn, dataset, tmp_path / "w", RunOptions(progress=False, hold_out=("case_02",)))
    # ...which an optional s2 skips when it comes to it
    d["stages"][1]["optional"] = d["stages"][2]["optional"] = True
    lenient = definition_from_dict(d, tmp_path)
    held = runner.PipelineRun(lenient, dataset, tmp_path / "w", RunOptions(progress=False, hold_out=("case_02",)))
    assert held.sets["partial"] == () and held.sets["full"] == ("case_00", "case_01")
    runner.run_stage(held, lenient.stage("s2"))
    assert read_state(tmp_path / "w", "s2")["status"] == "skipped" and "s2" not in held.models
    # from the command line: one line, the config error's exit code, before anything is trained
    d["stages"][0]["train"] = ["tumour"]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(d))
    assert cli_main(["pipeline", "run", str(path), "--dataset", str(dataset), "--work", str(tmp_path / "w2"),
                     "-q"]) == ConfigError.exit_code
    err = capfd.readouterr().err
    assert "stage 's1': its training set is empty" in err and not (tmp_path / "w2").exists()
