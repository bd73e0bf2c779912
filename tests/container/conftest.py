"""Fixtures of the challenge image's tests."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from image_recipe import REPO


@pytest.fixture(scope="session")
def wheel(tmp_path_factory) -> Path:
    """flare-rt's wheel, built from this checkout as the Dockerfile's first stage builds it."""
    dist = tmp_path_factory.mktemp("dist")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(dist), str(REPO)], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    return next(dist.glob("flare_rt-*.whl"))
