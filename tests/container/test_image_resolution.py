"""The image's `pip install` step, resolved without Docker. pip's resolver runs for the image's interpreter
and platform (the base image's Ubuntu: its CPython, manylinux x86_64 wheels up to its glibc, binary wheels
only) over the flare-rt wheel with each variant's extras and the constraints files the Dockerfile passes
(docker/constraints/common.txt and the variant's own). Each variant must install exactly those pins:
nothing the image installs floats, no pin is stale, every distribution admits the image's Python, the
default variant has no PyTorch.

TensorRT: its frontend ``tensorrt-cu12`` is built from its PyPI sdist into the real wheel, and its bindings
wheel comes from PyPI; its libs wheel lives only on pypi.nvidia.com, which no machine here reaches, so a
metadata-only wheel with the requirements NVIDIA's packaging source gives it (the CUDA runtime, from PyPI)
stands in for it. Needs PyPI, as CI's own install does."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from image_recipe import (TRT_FRONTEND, TRT_LIBS, constraint_options, cuda_major, image_python, installable, pins,
                          trt_libs_requirements, variant_extras, write_wheel)
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version


@pytest.fixture(scope="module")
def tensorrt_wheels(tmp_path_factory) -> Path:
    """A folder with TensorRT's frontend wheel (built from PyPI's sdist at the pinned version) and a stand-in
    for its libs wheel (NVIDIA's index only), for the resolver's ``--find-links``."""
    folder = tmp_path_factory.mktemp("tensorrt-wheels")
    version = str(pins("tensorrt")[TRT_FRONTEND])
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-binary", TRT_FRONTEND,
                        "--wheel-dir", str(folder), f"{TRT_FRONTEND}=={version}"],
                       capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, f"building {TRT_FRONTEND}=={version} from its PyPI sdist failed:\n{r.stderr[-3000:]}"
    write_wheel(folder, TRT_LIBS, version, trt_libs_requirements(cuda_major()))
    return folder


def resolve(wheel: Path, variant: str, tmp: Path, find_links: Path) -> dict[str, tuple[Version, str | None]]:
    """What the image's ``pip install -c common.txt -c VARIANT.txt wheel[extras]`` installs for ``variant``:
    canonical name -> (version, Requires-Python), flare-rt itself left out. ``find_links``: TensorRT's wheels."""
    python, glibc = image_python()
    platforms = [f"manylinux_2_{minor}_x86_64" for minor in range(17, glibc + 1)] + ["manylinux2014_x86_64"]
    report = tmp / "report.json"
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed",
           "--target", str(tmp / "target"), "--report", str(report), "--only-binary=:all:",
           "--implementation", "cp", "--python-version", python,
           # pip checks Requires-Python against the interpreter it runs in, not --python-version: checked below
           "--ignore-requires-python",
           *[arg for p in platforms for arg in ("--platform", p)],
           "--find-links", str(find_links),
           *constraint_options(variant),
           str(wheel), *installable(variant, tensorrt=True)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    assert r.returncode == 0, f"the image's pins do not resolve for variant {variant}:\n{r.stderr[-4000:]}"
    out = {}
    for item in json.loads(report.read_text())["install"]:
        meta = item["metadata"]
        key = canonicalize_name(meta["name"])
        if key != "flare-rt":
            out[key] = (Version(meta["version"]), meta.get("requires_python"))
    return out


@pytest.mark.parametrize("variant", sorted(variant_extras()))
def test_each_variant_installs_exactly_its_pins(variant, wheel, tensorrt_wheels, tmp_path):
    expected = pins(variant)
    resolved = resolve(wheel, variant, tmp_path, tensorrt_wheels)

    floating = {k: str(v) for k, (v, _) in resolved.items() if k not in expected}
    stale = sorted(set(expected) - set(resolved))
    assert not floating, \
        f"variant {variant} installs unpinned distributions: add to docker/constraints/{variant}.txt {floating}"
    assert not stale, f"docker/constraints/ pins {stale} for variant {variant}, which does not install them"
    assert {k: v for k, (v, _) in resolved.items()} == expected
    python, _ = image_python()
    for key, (version, requires) in resolved.items():
        assert requires is None or SpecifierSet(requires).contains(python), \
            f"{key} {version} requires Python {requires}; the image has {python}"
    assert ("torch" in resolved) == (variant == "torch")
