"""``flare-rt train`` refusing bad input: one error line with the typed error's exit code, raised before
any work, and nothing left in (or changed in) the output folder."""
from __future__ import annotations

import argparse
import re
import shutil
from pathlib import Path

import pytest

from flare_rt.cli import run_command
from flare_rt.errors import ConfigError, OutputError
from flare_rt.train.checkpoint import FINAL, LATEST
from flare_rt.train.command import register
from flare_rt.train.config import load_config, preset_path
from cli_errors import one_error_line

FAST = ["--set", "runtime.progress=false", "--set", "runtime.export=false", "--set", "runtime.num_workers=0",
        "--set", "schedule.epochs=1", "--set", "schedule.iterations_per_epoch=1", "--set", "schedule.val_iterations=1",
        "--set", "data.preprocess_workers=1", "--set", "runtime.device=cpu"]


def run(*argv: str) -> int:
    """``flare-rt train ARGV`` through the CLI's error handling (typed errors: one line, exit code)."""
    parser = argparse.ArgumentParser(prog="flare-rt")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["train", *argv])
    return run_command(args.func, args)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("below", ["", "out"])
def test_an_output_on_a_file_is_an_output_error_before_any_work(synthetic_root, tmp_path, capsys, below):
    blocker = tmp_path / "afile"
    blocker.write_bytes(b"")
    output = blocker / below if below else blocker
    index = tmp_path / "index.json"
    assert run("tiny", "--dataset", str(synthetic_root), "--output", str(output), "--index", str(index),
               *FAST) == OutputError.exit_code
    line = one_error_line(capsys)
    assert str(output) in line and "not a folder" in line
    assert blocker.read_bytes() == b"" and not index.exists()  # refused before indexing the dataset


@pytest.mark.parametrize("override,key,expected", [
    ("model=3", "model", "JSON object"),
    ("schedule.epochs=abc", "schedule.epochs", 'an integer, got "abc"'),
    ("schedule.epochs=2.5", "schedule.epochs", "an integer, got 2.5"),
    ("optim.lr=null", "optim.lr", "a finite number, got null"),
    ("optim.lr=NaN", "optim.lr", "a finite number, got NaN"),
    ("data.val_fraction=x", "data.val_fraction", 'a finite number, got "x"'),
    ('loss.ce_weight="x"', "loss.ce_weight", 'a finite number, got "x"'),
    ("loss.marginal=1", "loss.marginal", "true or false, got 1"),
    ("runtime.num_workers=true", "runtime.num_workers", "an integer, got true"),
    ('data.val_cases="case_01"', "data.val_cases", 'a list of strings, got "case_01"'),
    ("model.patch_size=[16,64]", "model.patch_size", "a list of 3 integers, got [16, 64]"),
    ("augment.rotation_deg=[1,2,\"x\"]", "augment.rotation_deg", "a list of 3 finite numbers"),
    ('model={"preset":[1]}', "model.preset", "must be one of"),
])
def test_a_wrongly_typed_value_names_its_key_value_and_type(tmp_path, capsys, override, key, expected):
    with pytest.raises(ConfigError, match=re.escape(key) + ".*" + re.escape(expected)):
        load_config(preset_path("tiny"), [f"data.dataset={tmp_path}", f"output={tmp_path / 'o'}", override])
    # from the command line: the config error's exit code, one line, nothing written
    assert run("tiny", "--dataset", str(tmp_path / "ds"), "--output", str(tmp_path / "o"), "--set",
               override) == ConfigError.exit_code
    assert key in one_error_line(capsys) and not (tmp_path / "o").exists()


def test_the_type_check_follows_the_field_types(tmp_path):
    """Numbers take ints, optional fields take null, tuples take JSON lists; a string is no number."""
    with pytest.raises(ConfigError, match=r'loss\.ce_weight must be a finite number, got "1"'):
        load_config(preset_path("tiny"), [f"data.dataset={tmp_path}", f"output={tmp_path / 'o'}",
                                          'loss.ce_weight="1"'])
    cfg = load_config(preset_path("tiny"), [f"data.dataset={tmp_path}", f"output={tmp_path / 'o'}", "optim.lr=1",
                                            "runtime.threads=null", "runtime.threads=2", 'data.val_cases=["a"]',
                                            "augment.scale_range=[1, 2.5]", "loss.ce_weight=0"])
    assert cfg.optim.lr == 1 and cfg.runtime.threads == 2 and cfg.data.val_cases == ("a",)
    assert cfg.augment.scale_range == (1, 2.5) and cfg.loss.ce_weight == 0


def images_only(synthetic_root: Path, root: Path) -> Path:
    shutil.copytree(synthetic_root / "imagesTr", root / "imagesTr")
    return root


@pytest.mark.parametrize("dataset", ["missing", "empty", "no_images", "images_without_labels"])
def test_a_refused_dataset_leaves_no_output(synthetic_root, tmp_path, capsys, dataset):
    root = tmp_path / "ds"
    if dataset == "empty":
        root.mkdir()
    elif dataset == "no_images":
        (root / "imagesTr").mkdir(parents=True)
    elif dataset == "images_without_labels":
        images_only(synthetic_root, root)
    out = tmp_path / "out"
    assert run("tiny", "--dataset", str(root), "--output", str(out), *FAST) == ConfigError.exit_code
    one_error_line(capsys)
    assert not out.exists()
    # an existing output folder stays as it was, too
    out.mkdir()
    assert run("tiny", "--dataset", str(root), "--output", str(out), *FAST, "--prepare-only") == ConfigError.exit_code
    assert list(out.iterdir()) == []


def test_a_refused_run_changes_nothing_in_its_output_folder(synthetic_root, tmp_path, capsys):
    out = tmp_path / "run"
    assert run("tiny", "--dataset", str(synthetic_root), "--output", str(out), *FAST) == 0
    assert (out / FINAL).is_file() and (out / LATEST).is_file()
    before = snapshot(out)
    capsys.readouterr()
    # a second run into the folder without --resume
    assert run("tiny", "--dataset", str(synthetic_root), "--output", str(out), *FAST,
               "--set", "schedule.epochs=7") == ConfigError.exit_code
    assert "already holds a run" in one_error_line(capsys)
    assert snapshot(out) == before
    # resuming with a configuration other than the checkpoint's
    assert run("tiny", "--dataset", str(synthetic_root), "--output", str(out), *FAST,
               "--set", "schedule.epochs=7", "--resume") == ConfigError.exit_code
    assert "different configuration" in one_error_line(capsys)
    assert snapshot(out) == before
