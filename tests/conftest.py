"""Shared fixtures and the suite's skip policy.

Real data and models come from ``flare_rt.resources`` (``$FLARE_RT_DATA`` / ``$FLARE_RT_MODELS``, by
default ``../shared`` beside the repository). Tests that need them FAIL when they are missing: a
suite that silently skips its real-data tests proves nothing. Tests that only need *a* CT use the
example CT in ``examples/`` (or a synthetic volume) and run everywhere.

With ``FLARE_RT_STRICT_SKIPS=1`` (set by ``.ci/run``) any skip whose reason is not a missing GPU,
CUDA or TensorRT turns into a failure, so an optional extra that CI should have installed cannot
hide its tests.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flare_rt.resources import shared_data_dir, shared_models_dir

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_CT = REPO / "examples" / "ts_example_ct.nii.gz"
#: Skip reasons allowed under FLARE_RT_STRICT_SKIPS: hardware and packages a CPU machine cannot have.
ALLOWED_SKIP = re.compile(r"\b(GPU|CUDA|TensorRT|tensorrt)\b")
#: Slices of the example CT kept by the ``small_ct`` fixture (as ts_example_ct_sm in ../shared/data).
SMALL_SLICES = (82, 112)


def _strict() -> bool:
    return os.environ.get("FLARE_RT_STRICT_SKIPS") == "1"


def _disallowed(report) -> str | None:
    if not report.skipped or not _strict():
        return None
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    return None if ALLOWED_SKIP.search(reason) else reason


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    reason = _disallowed(report)
    if reason is not None and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skip not allowed under FLARE_RT_STRICT_SKIPS=1: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    reason = _disallowed(report)
    if reason is not None:
        report.outcome = "failed"
        report.longrepr = f"{collector.nodeid}: module skipped, not allowed under FLARE_RT_STRICT_SKIPS=1: {reason}"


@pytest.fixture(autouse=True)
def _detach_cli_logging():
    """``cli.main`` points the root logger at the stderr of its moment (a capture stream in tests): drop
    that handler after each test so later tests do not log into a closed stream."""
    yield
    root = logging.getLogger()
    for handler in list(root.handlers):
        if type(handler) is logging.StreamHandler:
            root.removeHandler(handler)


def require(path: Path, what: str) -> Path:
    """``path`` if it exists; otherwise the test fails (not skips) with where to put the data."""
    if not path.exists():
        pytest.fail(f"{what} not found at {path}: put the shared data beside the repository (../shared) or set "
                    "FLARE_RT_DATA / FLARE_RT_MODELS", pytrace=False)
    return path


def require_module(module: str, extra: str = "dev") -> None:
    """Fail (not skip) when a package of an installable extra is missing."""
    if importlib.util.find_spec(module) is None:
        pytest.fail(f"{module} is not installed: pip install -e '.[{extra}]'", pytrace=False)


@pytest.fixture(scope="session")
def wheel(tmp_path_factory) -> Path:
    """flare-rt's wheel, built once from what the challenge image's first stage copies (pyproject.toml, README.md,
    flare_rt/), copied into a temporary folder: setuptools writes ``build/`` and ``*.egg-info`` beside its sources,
    so the checkout stays clean."""
    dest = tmp_path_factory.mktemp("wheel")
    src = dest / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "flare_rt", src / "flare_rt", ignore=shutil.ignore_patterns("__pycache__"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(dest / "dist"), str(src)], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    (whl,) = (dest / "dist").glob("flare_rt-*.whl")
    return whl


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = shared_data_dir()
    require(path / "ts_example_ct.nii.gz", "real CT data")
    return path


@pytest.fixture(scope="session")
def demo_nnunet_dir() -> Path:
    return require(shared_models_dir() / "ts_demo_small_nnunet" / "plans.json", "the nnU-Net demo model").parent


@pytest.fixture(scope="session")
def example_ct_path() -> Path:
    """The example CT shipped in the repository (122x101x112, 3 mm, direction diag(-1,-1,1))."""
    return EXAMPLE_CT


@pytest.fixture(scope="session")
def small_ct_path(tmp_path_factory) -> Path:
    """A 30-slice crop of the example CT (122x101x30): a real CT small enough for CLI tests. (nibabel, a base
    dependency, makes it: the GPU test machine has no SimpleITK.)"""
    import nibabel

    path = tmp_path_factory.mktemp("small_ct") / "small_ct.nii.gz"
    nibabel.save(nibabel.load(str(EXAMPLE_CT)).slicer[:, :, SMALL_SLICES[0]:SMALL_SLICES[1]], str(path))
    return path


@pytest.fixture(scope="session")
def fp32_bundle(tmp_path_factory, demo_nnunet_dir) -> Path:
    """The demo nnU-Net model imported as an fp32 bundle (same weights as nnU-Net runs)."""
    require_module("torch")
    from flare_rt.cli import main

    out = tmp_path_factory.mktemp("bundles") / "demo_fp32.onnx"
    assert main(["import-nnunet", str(demo_nnunet_dir), str(out), "-q"]) == 0
    return out
