"""Pipeline definitions: the packaged ones load, mistakes are caught at load time with the key that is
wrong, and case sets are selected by their annotated classes."""
from __future__ import annotations

import copy
import json

import pytest

from flare_rt.errors import ConfigError
from flare_rt.stages.definition import CaseSelector, definition_from_dict, load_definition
from flare_rt.stages.plan import stage_config
from flare_rt.stages.select import matches, select_case_sets
from flare_rt.train.dataset import CaseEntry, DatasetIndex

ORGANS = list(range(1, 14))


def test_the_packaged_definitions_are_the_papers_five_stages(tmp_path):
    paper = load_definition("paper")
    assert [s.name for s in paper.stages] == ["stage1", "stage2", "stage3", "stage4", "stage5"]
    assert [s.model for s in paper.stages] == ["big"] * 4 + ["small"]
    assert paper.case_set("dataset2").annotates_exactly == (1, 2, 3, 4, 13, 14)
    assert [(p.model, p.cases, p.classes) for s in paper.stages for p in s.pseudo_label] == [
        ("stage1", ("dataset2",), None), ("stage2", ("dataset1",), (14,)), ("stage3", ("dataset3",), None),
        ("stage4", ("dataset4",), None)]
    config = stage_config(paper, paper.stage("stage5"), tmp_path / "i.json", tmp_path / "o")
    assert config.model.patch_size == (32, 128, 192) and config.schedule.epochs == 1000
    demo = load_definition("demo")
    assert [s.optional for s in demo.stages] == [False, True, True, True, False]
    assert {c.id: c.annotated for c in demo.dataset.cases}["ts_sm"] == tuple(ORGANS)
    cfg = stage_config(demo, demo.stage("stage5"), tmp_path / "i.json", tmp_path / "o",
                       run_overrides={"runtime.threads": 2})
    assert cfg.model.orientation == "LPS" and cfg.optim.lr == 0.05 and cfg.schedule.iterations_per_epoch == 20
    assert cfg.runtime.threads == 2 and cfg.data.index == str(tmp_path / "i.json")


BASE = {"name": "x", "case_sets": {"a": {"labelled": True}, "u": {"labelled": False}},
        "stages": [{"name": "s1", "model": "tiny", "train": ["a"]},
                   {"name": "s2", "model": "tiny", "train": ["a", "u"],
                    "pseudo_label": [{"model": "s1", "cases": ["u"]}]}]}


@pytest.mark.parametrize("change,message", [
    (lambda d: d["stages"][1]["pseudo_label"][0].update(model="s2"), r"'s2'.*not an earlier stage"),
    (lambda d: d["stages"][1].update(train=["a", "nope"]), r"case set 'nope', which is not defined"),
    (lambda d: d["stages"][1]["pseudo_label"][0].update(classes=[0, 15]), r"classes: class ids \[0, 15\]"),
    (lambda d: d["stages"][1]["pseudo_label"][0].update(confidence_threshold=2), r"confidence_threshold must be"),
    (lambda d: d["stages"][0].update(budget={"epochs": 0, "iterations_per_epoch": 1}), r"must be >= 1"),
    (lambda d: d["stages"][0].update(trian=["a"]), r"unknown keys \['trian'\]"),
    (lambda d: d["case_sets"].update(b={"exclude": ["c"]}, c={"labelled": True}), r"b.exclude names \['c'\]"),
    (lambda d: d["case_sets"].update(b={}), r"case_sets.b has no condition"),
    (lambda d: d["stages"].append(dict(d["stages"][0])), r"stage names occur twice: \['s1'\]"),
    (lambda d: d["stages"][0].update(overrides={"optim.lrr": 1}), r"stage 's1'.*optim: unknown keys \['lrr'\]"),
    (lambda d: d["stages"][0].update(model="missing.json"), r"model config .*missing.json not found"),
])
def test_mistakes_are_caught_at_load_time(tmp_path, change, message):
    d = copy.deepcopy(BASE)
    change(d)
    path = tmp_path / "p.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ConfigError, match=message):
        load_definition(path)


def test_a_valid_definition_loads_and_names_resolve(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(BASE))
    d = load_definition(path)
    assert d.stage("s2").pseudo_label[0].classes is None and d.case_set("u").labelled is False
    assert definition_from_dict(d.to_dict(), tmp_path).to_dict() == d.to_dict()  # JSON is its saved form
    with pytest.raises(ConfigError, match="not found"):
        load_definition(tmp_path / "nope.json")


def entry(case_id: str, annotated, labelled=True) -> CaseEntry:
    return CaseEntry(case_id, f"/{case_id}.nii.gz", f"/{case_id}_seg.nii.gz" if labelled else None, (1, 1, 1),
                     (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1), tuple(annotated),
                     (0, *annotated) if labelled else (), "declared" if labelled else "unlabelled")


def test_case_sets_are_selected_by_their_annotated_classes():
    index = DatasetIndex((entry("full", ORGANS), entry("full_tumour", [*ORGANS, 14]),
                          entry("kits", [1, 2, 3, 4, 13, 14]), entry("liver", [1, 14]), entry("none", [], False)),
                         "test", "pairs", {})
    paper = load_definition("paper")
    assert select_case_sets(paper, index) == {"dataset1": ("full", "full_tumour"), "dataset2": ("kits",),
                                              "dataset3": ("liver",), "dataset4": ("none",)}
    sel = CaseSelector("x", annotates_any=(2, 13), labelled=True)
    assert [c.id for c in index.cases if matches(sel, c.id, c.labelled, c.annotated)] == ["full", "full_tumour",
                                                                                           "kits"]
    only = CaseSelector("y", cases=("liver", "kits"), annotates_all=(14,))
    assert [c.id for c in index.cases if matches(only, c.id, c.labelled, c.annotated)] == ["kits", "liver"]
    assert not matches(CaseSelector("z", annotates_exactly=(1, 14)), "liver", True, (0, 1, 14), frozenset({"liver"}))
