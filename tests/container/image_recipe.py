"""Reading the challenge image's recipe without Docker: the Dockerfile's instructions and environment,
docker/constraints.txt's pins (by variant section), pyproject.toml's requirements per extra."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
CONSTRAINTS = REPO / "docker" / "constraints.txt"
#: The lines of constraints.txt before the first "# variant NAME" header: pins both variants install.
COMMON = "common"
#: TensorRT's packages on PyPI that are source stubs: building them downloads the real wheels from NVIDIA's
#: index, which no machine here reaches. Its bindings wheel, on PyPI for CPython 3.12, can stand in.
TRT_STUBS = {"tensorrt-cu12", "tensorrt-cu12-libs"}
TRT_STAND_IN = "tensorrt-cu12-bindings"


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


def base_image() -> str:
    for cmd, args in instructions():
        if cmd == "ARG" and args.startswith("CUDA_IMAGE="):
            return args.split("=", 1)[1]
    raise AssertionError("Dockerfile has no ARG CUDA_IMAGE=nvidia/cuda:X.Y.Z-...")


def cuda_major() -> int:
    m = re.search(r"nvidia/cuda:(\d+)\.\d+\.\d+-", base_image())
    assert m, f"CUDA_IMAGE={base_image()} is not an nvidia/cuda:X.Y.Z-... image"
    return int(m.group(1))


def variant_extras() -> dict[str, list[str]]:
    """VARIANT -> the extras the Dockerfile installs for it (its ``case`` over $VARIANT)."""
    (run,) = [args for cmd, args in instructions() if cmd == "RUN" and "VARIANT" in args]
    return {v: e.split(",") for v, e in re.findall(r"(\w+)\)\s*extras=([\w,]+)", run)}


def pin_sections() -> dict[str, dict[str, Version]]:
    """constraints.txt's pins by section: :data:`COMMON`, then one per ``# variant NAME`` header."""
    out: dict[str, dict[str, Version]] = {COMMON: {}}
    section, seen = COMMON, set()
    for raw in CONSTRAINTS.read_text().splitlines():
        header = re.match(r"#\s*variant\s+(\w+)", raw)
        if header:
            section = header.group(1)
            assert section not in out, f"constraints.txt has two '# variant {section}' sections"
            out[section] = {}
        line = raw.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not pinned with =="
            key = canonicalize_name(name)
            assert key not in seen, f"constraints.txt pins {name} twice"
            seen.add(key)
            out[section][key] = Version(version)
    return out


def pins() -> dict[str, Version]:
    """Every pin of constraints.txt, canonical name -> version."""
    return {k: v for section in pin_sections().values() for k, v in section.items()}


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


def installable(variant: str, stand_in: bool) -> list[str]:
    """The requirements the image's ``pip install`` puts in for ``variant`` (flare-rt's own and its
    extras'), without TensorRT's PyPI stubs; ``stand_in`` adds TensorRT's bindings wheel in their place."""
    reqs = requirements(variant_extras()[variant])
    out = [str(r) for r in reqs if canonicalize_name(r.name) not in TRT_STUBS]
    if stand_in and len(out) < len(reqs):
        out.append(TRT_STAND_IN)
    return out


def cuda_suffix(name: str) -> int | None:
    """The CUDA major a wheel's name says it is built for: cupy-cuda12x -> 12, tensorrt-cu12 -> 12."""
    m = re.search(r"-cu(?:da)?(\d+)", canonicalize_name(name))
    return int(m.group(1)[:2]) if m else None


#: The base image's Ubuntu release -> its python3 and its glibc minor (manylinux_2_17 ... manylinux_2_N).
UBUNTU = {"ubuntu24.04": ("3.12", 39)}


def image_python() -> tuple[str, int]:
    """The image's Python version ("3.12") and glibc minor, from the base image's Ubuntu release."""
    m = re.search(r"-(ubuntu\d+\.\d+)$", base_image())
    assert m and m.group(1) in UBUNTU, \
        f"base image {base_image()}: add its Ubuntu release's python3 and glibc to UBUNTU in image_recipe.py"
    return UBUNTU[m.group(1)]


def find_interpreter(version: str) -> Path:
    """A CPython ``version`` on this machine (pyenv's, or the system's) to stand in for the image's."""
    candidates = sorted(Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")).glob(
        f"versions/{version}.*/bin/python{version}"), reverse=True)
    candidates += [Path(p) for p in (f"/usr/bin/python{version}", f"/usr/local/bin/python{version}",
                                     shutil.which(f"python{version}")) if p and Path(p).is_file()]
    for path in candidates:
        probe = subprocess.run([str(path), "-c", "import sys, venv; print(sys.version_info[:2])"],
                               capture_output=True, text=True, check=False)
        if probe.returncode == 0 and probe.stdout.strip() == str(tuple(map(int, version.split(".")))):
            return path
    raise AssertionError(f"no Python {version} (the image's) found among {[str(c) for c in candidates]}: "
                         f"install it (pyenv install {version}) to test predict.sh in the image's environment")
