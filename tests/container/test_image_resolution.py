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
import subprocess
import sys
from pathlib import Path

import pytest
from image_recipe import COMMON, CONSTRAINTS, TRT_STUBS, image_python, installable, pin_sections, variant_extras
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version


def resolve(wheel: Path, variant: str, tmp: Path) -> dict[str, tuple[Version, str | None]]:
    """What ``pip install -c constraints.txt wheel[extras]`` installs in the image for ``variant``: canonical
    name -> (version, Requires-Python), flare-rt itself left out."""
    python, glibc = image_python()
    platforms = [f"manylinux_2_{minor}_x86_64" for minor in range(17, glibc + 1)] + ["manylinux2014_x86_64"]
    report = tmp / "report.json"
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed",
           "--target", str(tmp / "target"), "--report", str(report), "--only-binary=:all:",
           "--implementation", "cp", "--python-version", python,
           # pip checks Requires-Python against the interpreter it runs in, not --python-version: checked below
           "--ignore-requires-python",
           *[arg for p in platforms for arg in ("--platform", p)],
           "--constraint", str(CONSTRAINTS), str(wheel), *installable(variant, stand_in=True)]
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
def test_each_variant_installs_exactly_its_pins(variant, wheel, tmp_path):
    sections = pin_sections()
    expected = {k: v for k, v in {**sections[COMMON], **sections[variant]}.items() if k not in TRT_STUBS}
    resolved = resolve(wheel, variant, tmp_path)

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
