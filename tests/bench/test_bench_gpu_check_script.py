"""bench/gpu_check.sh stops at its first step, with one clear line, when the payload is wrong."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def tree(tmp_path):
    """A copy of the parts of the checkout the script's first steps use (no .git: walked, as on the device)."""
    root = tmp_path / "repo"
    shutil.copytree(REPO / "bench", root / "bench", ignore=shutil.ignore_patterns("results", "__pycache__"))
    shutil.copytree(REPO / "flare_rt", root / "flare_rt", ignore=shutil.ignore_patterns("__pycache__", "*.onnx"))
    return root


def run_script(root: Path, out: Path, *args: str):
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(out), "GPUCHECK_WORK": str(out.parent / "work")}
    return subprocess.run(["bash", str(root / "bench" / "gpu_check.sh"), "--dry-run", *args], capture_output=True,
                          text=True, env=env, timeout=300)


def test_shell_syntax():
    assert subprocess.run(["bash", "-n", str(REPO / "bench" / "gpu_check.sh")]).returncode == 0


def test_unprepared_folder_stops_the_check(tree, tmp_path):
    res = run_script(tree, tmp_path / "out")
    assert res.returncode == 2
    assert "prepared folder incomplete" in res.stdout and "run bench/gpu_prepare.py" in res.stdout
    assert "payload check failed: stop" in res.stdout
    assert "START data" not in res.stdout
    assert (tmp_path / "out" / "gpu_check.log").read_text().count("payload check failed") == 1


def test_oversized_payload_stops_the_check(tree, tmp_path):
    dest = tree / ".gpucheck"
    (dest / "wheels").mkdir(parents=True)
    big = dest / "wheels" / "huge-1.0-py3-none-any.whl"
    with open(big, "wb") as f:
        f.truncate(70 * 2**20)  # sparse: 70 MiB on paper
    (dest / "manifest.json").write_text(json.dumps({"files": [], "model": {}}))
    res = run_script(tree, tmp_path / "out")
    assert res.returncode == 2
    assert "OVER the limit" in res.stdout and "payload 7" in res.stdout
    assert "START wheels" not in res.stdout and "START data" not in res.stdout
