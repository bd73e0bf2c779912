"""Shared fixtures: real data from ../shared (skipped with a reason where absent), built bundles."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DEMO_NNUNET = SHARED / "models" / "ts_demo_small_nnunet"
DEMO_BUNDLE = REPO / "models" / "ts_demo_small_fp16.onnx"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = SHARED / "data"
    if not (path / "ts_example_ct.nii.gz").is_file():
        pytest.skip(f"real CT data not found at {path} (the ../shared folder beside the repository)")
    return path


@pytest.fixture(scope="session")
def demo_nnunet_dir() -> Path:
    if not (DEMO_NNUNET / "plans.json").is_file():
        pytest.skip(f"nnU-Net demo model not found at {DEMO_NNUNET}")
    return DEMO_NNUNET


def _need(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed (pip install -e '.[dev]')")


@pytest.fixture(scope="session")
def fp32_bundle(tmp_path_factory, demo_nnunet_dir) -> Path:
    """The demo nnU-Net model imported as an fp32 bundle (same weights as nnU-Net runs)."""
    _need("torch")
    from flare_rt.cli import main

    out = tmp_path_factory.mktemp("bundles") / "demo_fp32.onnx"
    assert main(["import-nnunet", str(demo_nnunet_dir), str(out), "-q"]) == 0
    return out
