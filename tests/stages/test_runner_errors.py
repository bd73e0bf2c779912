"""``flare-rt pipeline`` refusing bad input: one error line with the typed error's exit code, raised before
any stage runs, and no work folder (or nothing new in an existing one) left behind."""
from __future__ import annotations

import importlib
import json
import re
import shutil
from pathlib import Path

import pytest

import flare_rt.train
from flare_rt.cli import main as cli_main
from flare_rt.errors import ConfigError, OutputError
from flare_rt.stages import runner
from flare_rt.stages.definition import definition_from_dict
from flare_rt.stages.runner import RunOptions
from cli_errors import one_error_line

DEFINITION = {
    "name": "mini",
    "defaults": {"overrides": {"runtime.num_workers": 0, "schedule.val_iterations": 1, "data.val_fraction": 0,
                               "data.preprocess_workers": 1, "runtime.device": "cpu"}},
    "case_sets": {"full": {"labelled": True}, "unlabelled": {"labelled": False}},
    "stages": [
        {"name": "s1", "model": "tiny", "train": ["full"], "budget": {"epochs": 1, "iterations_per_epoch": 1}},
        {"name": "s2", "model": "tiny", "train": ["full", "unlabelled"], "budget": {"epochs": 1, "iterations_per_epoch": 1},
         "pseudo_label": [{"model": "s1", "cases": ["unlabelled"]}]}]}


@pytest.fixture
def definition_file(tmp_path) -> Path:
    path = tmp_path / "mini.json"
    path.write_text(json.dumps(DEFINITION))
    return path


@pytest.fixture
def nothing_trains(monkeypatch):
    """Any stage that starts training fails the test (these runs must be refused before)."""
    def boom(*a, **k):
        raise AssertionError("a stage was trained before the run was refused")

    monkeypatch.setattr(flare_rt.train, "train", boom)
    monkeypatch.setattr(importlib.import_module("flare_rt.train.prepare"), "prepare", boom)


def pipeline(*argv: str) -> int:
    return cli_main(["pipeline", *argv])


@pytest.mark.parametrize("below", ["", "w"])
def test_a_work_folder_on_a_file_is_an_output_error(definition_file, dataset, tmp_path, capfd, below, nothing_trains):
    blocker = tmp_path / "afile"
    blocker.write_bytes(b"")
    work = blocker / below if below else blocker
    assert pipeline("run", str(definition_file), "--dataset", str(dataset), "--work", str(work),
                    "-q") == OutputError.exit_code
    line = one_error_line(capfd)
    assert str(work) in line and "not a folder" in line and blocker.read_bytes() == b""


@pytest.mark.parametrize("flag,value", [("--backend", "bogus"), ("--device", "tpu"), ("--threads", "0"),
                                        ("--workers", "0"), ("--train-workers", "-1")])
def test_bad_run_options_are_refused_before_any_stage(definition_file, dataset, tmp_path, capfd, flag, value,
                                                      nothing_trains):
    work = tmp_path / "w"
    assert pipeline("run", str(definition_file), "--dataset", str(dataset), "--work", str(work), flag, value,
                    "-q") == ConfigError.exit_code
    line = one_error_line(capfd)
    assert value in line and not work.exists()


def test_run_options_name_the_valid_backends_and_devices():
    with pytest.raises(ConfigError, match=r"--backend must be auto or one of \[.*'onnxruntime'.*\], got 'bogus'"):
        RunOptions(backend="bogus")
    with pytest.raises(ConfigError, match="--device must be one of auto, cpu, cuda, got 'tpu'"):
        RunOptions(device="tpu")
    assert RunOptions(backend="onnxruntime", device="cpu", threads=2).backend == "onnxruntime"


def make_dataset(kind: str, root: Path, source: Path) -> Path:
    if kind == "empty":
        root.mkdir()
    elif kind == "no_images":
        (root / "imagesTr").mkdir(parents=True)
    elif kind == "images_without_labels":
        shutil.copytree(source / "imagesTr", root / "imagesTr")
    return root


@pytest.mark.parametrize("kind", ["missing", "empty", "no_images", "images_without_labels"])
def test_a_refused_dataset_leaves_no_work_folder(definition_file, dataset, tmp_path, capfd, kind, nothing_trains):
    root = make_dataset(kind, tmp_path / "ds", dataset)
    work = tmp_path / "w"
    assert pipeline("run", str(definition_file), "--dataset", str(root), "--work", str(work),
                    "-q") == ConfigError.exit_code
    one_error_line(capfd)
    assert not work.exists()
    # an existing (empty) work folder stays empty, so status does not report a half-started run
    work.mkdir()
    assert pipeline("run", str(definition_file), "--dataset", str(root), "--work", str(work),
                    "-q") == ConfigError.exit_code
    assert list(work.iterdir()) == []
    capfd.readouterr()
    assert pipeline("status", "--work", str(work)) == ConfigError.exit_code
    assert "no pipeline run here" in one_error_line(capfd)


def test_labels_resampled_for_a_refused_dataset_are_removed(tmp_path, shared_data, nothing_trains):
    d = json.loads(json.dumps(DEFINITION))
    d["dataset"] = {"cases": [{"id": "a", "image": "ts_example_ct_sm.nii.gz",
                               "label": "ts_example_ct_sm_seg_flare.nii.gz", "resample_label": True}]}
    d["case_sets"]["full"] = {"annotates_all": [14]}  # no case: stage s1 cannot run
    definition = definition_from_dict(d, tmp_path)
    work = tmp_path / "w"
    with pytest.raises(ConfigError, match="stage 's1': its training set is empty"):
        runner.PipelineRun(definition, shared_data, work, RunOptions(progress=False))
    assert not work.exists()


@pytest.mark.parametrize("content,problem", [
    ('{"name": "x", "stages": [{"foo": 1}]}', r"stages\[0\] is \{\"foo\": 1\}, not an object with a 'name'"),
    ("[1, 2]", "a JSON list, not an object"),
    ('{"name": "x", "stages": 3}', "no 'stages' list"),
    ('{"stages": []}', "no 'name'"),
    ('{"name": "x", "stages": [], "case_sets": []}', "'case_sets' is not a JSON object"),
    ('{"name": "x",', "not valid JSON"),
])
def test_status_of_a_malformed_definition_names_the_file(tmp_path, capfd, content, problem):
    (tmp_path / "definition.json").write_text(content)
    assert pipeline("status", "--work", str(tmp_path)) == ConfigError.exit_code
    line = one_error_line(capfd)
    assert str(tmp_path / "definition.json") in line and "flare-rt pipeline run" in line
    assert re.search(problem, line), line


def test_status_reads_state_files_that_are_not_objects_as_pending(tmp_path, capfd):
    (tmp_path / "definition.json").write_text('{"name": "x", "stages": [{"name": "s1"}, {"name": "s2"}]}')
    (tmp_path / "run.json").write_text("[]")
    (tmp_path / "stages" / "s1").mkdir(parents=True)
    (tmp_path / "stages" / "s1" / "state.json").write_text("[1]")
    assert pipeline("status", "--work", str(tmp_path)) == 0
    out = capfd.readouterr().out
    assert "not finished" in out and "s1         pending" in out and "s2         pending" in out


@pytest.mark.parametrize("budget,key", [({"epochs": "abc", "iterations_per_epoch": 1}, "budget.epochs"),
                                        ({"epochs": 1, "iterations_per_epoch": 1, "batch_size": 1.5},
                                         "budget.batch_size")])
def test_a_wrongly_typed_budget_is_a_config_error(tmp_path, budget, key):
    d = json.loads(json.dumps(DEFINITION))
    d["stages"][0]["budget"] = budget
    with pytest.raises(ConfigError, match=f"{key} must be an integer"):
        definition_from_dict(d, tmp_path)
