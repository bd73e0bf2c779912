"""A normal (non-editable) install works: the wheel carries the default model as package data, a fresh
virtual environment with only the base dependencies segments a real CT (30 slices of the example CT) with it from
another directory, and nothing is written into site-packages (caches go to the user cache folder)."""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from flare_rt.resources import DEFAULT_MODEL_NAME

def run(cmd, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=1200, **kw)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


def tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def test_wheel_install_segments_with_the_packaged_model(wheel, small_ct_path, tmp_path):
    names = zipfile.ZipFile(wheel).namelist()
    assert f"flare_rt/models/{DEFAULT_MODEL_NAME}" in names
    assert not any(n.startswith(("tests/", "bench/", "examples/")) for n in names)

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", venv])
    py = venv / "bin" / "python"
    run([py, "-m", "pip", "install", "-q", wheel])
    site = Path(run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    before = tree(site)

    work, home = tmp_path / "elsewhere", tmp_path / "home"
    work.mkdir()
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLARE_RT_", "PYTHON", "VIRTUAL_ENV"))}
    env.update(HOME=str(home), PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}")
    proc = run([venv / "bin" / "flare-rt", "segment", small_ct_path, "seg.nii.gz",
                "--threads", "2"], cwd=work, env=env)
    assert DEFAULT_MODEL_NAME in proc.stderr  # the packaged model was used, and said so
    origin = run([py, "-c", "import flare_rt.resources as r; print(r.packaged_model())"], cwd=work, env=env)
    assert origin.stdout.strip().startswith(str(site))

    seg = sitk.ReadImage(str(work / "seg.nii.gz"))
    ct = sitk.ReadImage(str(small_ct_path))
    assert seg.GetSize() == ct.GetSize() and seg.GetDirection() == ct.GetDirection()
    assert len(np.unique(sitk.GetArrayFromImage(seg))) >= 3
    new = {p for p in tree(site) - before if "__pycache__" not in p}
    assert new == set(), f"written into site-packages: {sorted(new)[:5]}"
