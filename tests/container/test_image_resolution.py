"""The image's `pip install` step, resolved without Docker. pip's resolver runs for the image's interpreter
and platform (the base image's Ubuntu: its CPython, manylinux x86_64 wheels up to its glibc, binary wheels
only) over the flare-rt wheel with each variant's extras and docker/constraints.txt. Each variant must
install exactly its pins (the constraints' common section plus its own): nothing the image installs
floats, no pin is stale, every distribution admits the image's Python, the default variant has no PyTorch.

TensorRT's meta and libs packages on PyPI are source stubs that fetch the real wheels from NVIDIA's index
when built, which no machine here reaches: the default variant is resolved with TensorRT's bindings wheel
(published on PyPI for CPython 3.12, same version) in their place; test_dockerfile checks that the three
TensorRT pins agree. Needs PyPI, as CI's own install does."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from image_recipe import COMMON, CONSTRAINTS, REPO, base_image, pin_sections, requirements, variant_extras
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

#: The base image's Ubuntu release -> its python3 and its glibc minor (manylinux_2_17 ... manylinux_2_N).
UBUNTU = {"ubuntu24.04": ("3.12", 39)}
#: Source stubs on PyPI that download from NVIDIA's index when built; their bindings wheel stands in.
TRT_STUBS = {"tensorrt-cu12", "tensorrt-cu12-libs"}
TRT_STAND_IN = "tensorrt-cu12-bindings"


def image_python() -> tuple[str, int]:
    m = re.search(r"-(ubuntu\d+\.\d+)$", base_image())
    assert m and m.group(1) in UBUNTU, \
        f"base image {base_image()}: add its Ubuntu release's python3 and glibc to UBUNTU in this test"
    return UBUNTU[m.group(1)]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    dist = tmp_path_factory.mktemp("dist")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(dist), str(REPO)], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    return next(dist.glob("flare_rt-*.whl"))


def resolve(wheel: Path, extras: list[str], tmp: Path) -> dict[str, tuple[Version, str | None]]:
    """What ``pip install -c constraints.txt wheel[extras]`` installs in the image: canonical name ->
    (version, Requires-Python), flare-rt itself left out."""
    python, glibc = image_python()
    reqs, stubbed = [], False
    for req in requirements(extras):
        if canonicalize_name(req.name) in TRT_STUBS:
            stubbed = True
        else:
            reqs.append(str(req))
    if stubbed:
        reqs.append(TRT_STAND_IN)
    platforms = [f"manylinux_2_{minor}_x86_64" for minor in range(17, glibc + 1)] + ["manylinux2014_x86_64"]
    report = tmp / "report.json"
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed",
           "--target", str(tmp / "target"), "--report", str(report), "--only-binary=:all:",
           "--implementation", "cp", "--python-version", python,
           # pip checks Requires-Python against the interpreter it runs in, not --python-version: checked below
           "--ignore-requires-python",
           *[arg for p in platforms for arg in ("--platform", p)],
           "--constraint", str(CONSTRAINTS), str(wheel), *reqs]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    assert r.returncode == 0, f"the image's pins do not resolve for extras {extras}:\n{r.stderr[-4000:]}"
    out = {}
    for item in json.loads(report.read_text())["install"]:
        meta = item["metadata"]
        key = canonicalize_name(meta["name"])
        if key != "flare-rt":
            out[key] = (Version(meta["version"]), meta.get("requires_python"))
    return out


@pytest.mark.parametrize("variant", sorted(variant_extras()))
def test_each_variant_installs_exactly_its_pins(variant, wheel, tmp_path):
    sections = pin_sections()
    expected = {**sections[COMMON], **sections[variant]}
    if variant == "tensorrt":
        expected = {k: v for k, v in expected.items() if k not in TRT_STUBS}
    resolved = resolve(wheel, variant_extras()[variant], tmp_path)

    floating = {k: str(v) for k, (v, _) in resolved.items() if k not in expected}
    stale = sorted(set(expected) - set(resolved))
    assert not floating, f"variant {variant} installs unpinned distributions: add to constraints.txt {floating}"
    assert not stale, f"constraints.txt pins {stale} for variant {variant}, which does not install them"
    assert {k: v for k, (v, _) in resolved.items()} == expected
    python, _ = image_python()
    for key, (version, requires) in resolved.items():
        assert requires is None or SpecifierSet(requires).contains(python), \
            f"{key} {version} requires Python {requires}; the image has {python}"
    assert ("torch" in resolved) == (variant == "torch")
