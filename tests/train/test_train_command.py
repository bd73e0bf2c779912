"""``flare-rt train`` through ``register`` on a fresh argparse parser (as flare_rt.cli wires it)."""
from __future__ import annotations

import argparse

from flare_rt.cli import run_command
from flare_rt.train.checkpoint import FINAL, LATEST
from flare_rt.train.command import main, register


def run(*argv: str) -> int:
    """``flare-rt train ARGV`` through the CLI's error handling (typed errors: one line, exit code)."""
    parser = argparse.ArgumentParser(prog="flare-rt")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["train", *argv])
    return run_command(args.func, args)


def test_prepare_train_and_resume_from_the_command_line(synthetic_root, tmp_path, capsys):
    out = tmp_path / "run"
    common = ["tiny", "--dataset", str(synthetic_root), "--output", str(out), "--set", "runtime.progress=false",
              "--set", "runtime.export=false", "--set", "runtime.num_workers=0", "--set", "schedule.epochs=2",
              "--set", "schedule.iterations_per_epoch=1", "--set", "schedule.val_iterations=1"]
    assert run(*common, "--prepare-only") == 0
    assert (out / "dataset_index.json").is_file() and (out / "cache_4x2.4x2.4" / "fingerprint.json").is_file()
    assert not (out / LATEST).exists()
    assert run(*common) == 0
    assert (out / FINAL).is_file() and (out / "progress.csv").is_file()
    capsys.readouterr()
    assert run(*common) == 6  # ConfigError: the run exists
    assert "--resume" in capsys.readouterr().err
    assert run(*common, "--resume") == 0  # already complete: nothing to redo


def test_errors_become_exit_codes(tmp_path, capsys):
    assert main(["tiny", "--dataset", str(tmp_path / "missing"), "--output", str(tmp_path / "o")]) == 6
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("flare-rt: error: ") and "dataset folder not found" in err[-1]
    assert run("nonexistent_preset") == 6
    assert "available" in capsys.readouterr().err
