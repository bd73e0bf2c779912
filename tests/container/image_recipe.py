"""Reading the challenge image's recipe without Docker: the Dockerfile's instructions and environment,
docker/constraints/'s pins (common, then one file per variant), pyproject.toml's requirements per extra."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
#: docker/constraints/: ``common.txt`` (pins both variants install), then ``<variant>.txt`` for each variant.
CONSTRAINTS = REPO / "docker" / "constraints"
COMMON = "common"
#: TensorRT's distributions (the default variant's extra names the first; it requires the other two at its
#: own version). On PyPI: ``tensorrt-cu12``, a setuptools sdist (built here into the real wheel), and the
#: bindings wheel for CPython 3.12. ``tensorrt-cu12-libs`` on PyPI is a wheel-stub sdist whose build
#: downloads the real wheel from pypi.nvidia.com, which no machine here reaches.
TRT_DISTRIBUTIONS = ("tensorrt-cu12", "tensorrt-cu12-bindings", "tensorrt-cu12-libs")
TRT_FRONTEND, TRT_LIBS = "tensorrt-cu12", "tensorrt-cu12-libs"


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


def install_step() -> str:
    """The Dockerfile's RUN that installs flare-rt (its ``case`` over $VARIANT, pip, the pin check)."""
    (run,) = [args for cmd, args in instructions() if cmd == "RUN" and "VARIANT" in args]
    return run


def variant_extras() -> dict[str, list[str]]:
    """VARIANT -> the extras the Dockerfile installs for it (its ``case`` over $VARIANT)."""
    return {v: e.split(",") for v, e in re.findall(r"(\w+)\)\s*extras=([\w,]+)", install_step())}


def constraint_args() -> list[str]:
    """The paths the install step's pip takes as ``--constraint``, as written (``${VARIANT}`` unexpanded)."""
    return re.findall(r'--constraint\s+"?([^"\s]+)"?', install_step())


def pin_sections() -> dict[str, dict[str, Version]]:
    """docker/constraints/'s pins by file: :data:`COMMON`, then one per variant (``torch.txt`` -> ``torch``).
    A distribution pinned in common.txt is pinned nowhere else; variants may pin different releases of the
    same distribution."""
    out: dict[str, dict[str, Version]] = {}
    for path in sorted(CONSTRAINTS.glob("*.txt")):
        section = out.setdefault(path.stem, {})
        for raw in path.read_text().splitlines():
            line = raw.split("#")[0].strip()
            if line:
                name, _, version = line.partition("==")
                assert version, f"{path.name}: {line!r} is not pinned with =="
                assert canonicalize_name(name) not in section, f"{path.name} pins {name} twice"
                section[canonicalize_name(name)] = Version(version)
    assert COMMON in out, f"{CONSTRAINTS} has no {COMMON}.txt"
    for variant, section in out.items():
        both = sorted(set(section) & set(out[COMMON])) if variant != COMMON else []
        assert not both, f"{variant}.txt pins {both}, which {COMMON}.txt pins too"
    return out


def constraint_files(variant: str) -> list[Path]:
    """The files the Dockerfile's ``pip install`` passes as ``--constraint`` for ``variant`` (``${VARIANT}``
    substituted), as paths in this checkout (the folder COPY brings docker/constraints/ to, mapped back)."""
    (copy,) = [args.split() for cmd, args in instructions() if cmd == "COPY" and "docker/constraints/" in args]
    dest = copy[-1].rstrip("/") + "/"
    out = []
    for given in constraint_args():
        given = given.replace("${VARIANT}", variant)
        assert given.startswith(dest), f"--constraint {given} is not in {dest} (COPY docker/constraints/ {dest})"
        out.append(CONSTRAINTS / given[len(dest):])
    return out


def constraint_options(variant: str) -> list[str]:
    """``--constraint FILE`` for each of :func:`constraint_files`, for a ``pip install`` run here."""
    return [arg for f in constraint_files(variant) for arg in ("--constraint", str(f))]


def pins(variant: str) -> dict[str, Version]:
    """What ``variant`` pins (common.txt and its own file), canonical name -> version."""
    sections = pin_sections()
    return {**sections[COMMON], **sections[variant]}


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


def installable(variant: str, tensorrt: bool) -> list[str]:
    """The requirements the image's ``pip install`` puts in for ``variant`` (flare-rt's own and its
    extras'); ``tensorrt=False`` leaves TensorRT out (for an environment built on a machine that cannot
    fetch its libraries)."""
    return [str(r) for r in requirements(variant_extras()[variant])
            if tensorrt or canonicalize_name(r.name) not in TRT_DISTRIBUTIONS]


def trt_libs_requirements(cuda: int) -> list[str]:
    """What NVIDIA's ``tensorrt-cu<cuda>-libs`` wheel requires: the CUDA runtime of its major, from PyPI.
    Read off NVIDIA/TensorRT's python/packaging/libs_wheel/setup.py (``get_requirements``), the same in
    the 10.14 and 10.15 releases; the 10.16 wheel itself is only on pypi.nvidia.com."""
    return [f"cuda-toolkit[cudart]>={cuda},<{cuda + 1}"]


def write_wheel(folder: Path, name: str, version: str, requires: list[str]) -> Path:
    """A metadata-only wheel of ``name`` ``version`` that requires ``requires``: stands in for a wheel
    that cannot be downloaded here when pip resolves (``--find-links folder``). Installing it brings its
    requirements and no code."""
    dist = f"{canonicalize_name(name).replace('-', '_')}-{version}"
    meta = "\n".join(["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}",
                      *(f"Requires-Dist: {r}" for r in requires)]) + "\n"
    files = {f"{dist}.dist-info/METADATA": meta,
             f"{dist}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: flare-rt tests\nRoot-Is-Purelib: true\n"
                                        "Tag: py3-none-any\n"}
    files[f"{dist}.dist-info/RECORD"] = "".join(f"{f},,\n" for f in files) + f"{dist}.dist-info/RECORD,,\n"
    path = folder / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for arc, text in files.items():
            z.writestr(arc, text)
    return path


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
