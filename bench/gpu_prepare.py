"""Preparation of the GPU check (run HERE, where the package registry and the shared model are): fills
the git-ignored folder ``.gpucheck/`` that travels with the repository to the device machine.

    python bench/gpu_prepare.py                  # wheels + model folder + manifest, then the payload check
    python bench/gpu_prepare.py --check-payload  # only the size check (bench/gpu_check.sh runs this there)
    python bench/gpu_prepare.py --list           # the files it would put there, without downloading

``.gpucheck/`` holds:

- ``wheels/``: the wheels of bench/gpu_wheels.txt for CPython 3.12 manylinux x86-64 (``pip download
  --no-deps --only-binary=:all:``; a pure-Python wheel is built here for a package PyPI has as sdist only);
- ``model/<name>/``: the nnU-Net model folder's ``plans.json`` and ``dataset.json``, and its checkpoint when
  everything fits into the payload limit with a margin (``--model auto``); otherwise bench/gpu_check.sh
  rebuilds the checkpoint there from the packaged bundle's weights (bench/nnunet_folder.py);
- ``manifest.json``: every file with its size and SHA-256, the model mode, the payload sizes.

The device machine receives at most 64 MiB: the repository's tracked and untracked-not-ignored files
plus the carried folders. The check adds those up and fails with one line naming the sizes.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from benchpath import BENCH, REPO  # noqa: E402,F401  (sys.path: this checkout)
from flare_rt.trt.cache import file_sha256  # noqa: E402  (no TensorRT import)

log = logging.getLogger("bench.gpu_prepare")

DEST = ".gpucheck"
WHEELS_LIST = BENCH / "gpu_wheels.txt"
LIMIT_BYTES = 64 * 2**20  # what the device machine receives in one call
MARGIN_BYTES = 4 * 2**20  # kept free when deciding to carry the checkpoint (the repository grows)
PYTHON_VERSION = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")
MODEL_FILES = ("plans.json", "dataset.json")
EXCLUDED_DIRS = {".git", "__pycache__", ".pytest_cache", ".venv", ".ruff_cache"}


class PayloadError(RuntimeError):
    """The payload does not fit, or the prepared folder is incomplete."""


@dataclass(frozen=True)
class Requirement:
    name: str
    version: str
    sdist: bool = False  # PyPI has no wheel: build a pure-Python one here

    @property
    def wheel_prefix(self) -> str:
        """The start of the wheel's file name (PEP 427: name normalised with underscores)."""
        return f"{re.sub(r'[-_.]+', '_', self.name).lower()}-{self.version}-"


def parse_requirements(path: Path = WHEELS_LIST) -> list[Requirement]:
    reqs = []
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        spec, *flags = line.split()
        name, sep, version = spec.partition("==")
        if not sep or not name or not version or set(flags) - {"sdist"}:
            raise ValueError(f"{path}:{n}: expected 'name==version [sdist]', got {raw!r}")
        reqs.append(Requirement(name, version, "sdist" in flags))
    return reqs


def wheel_for(req: Requirement, wheels: Path) -> Path | None:
    found = sorted(p for p in wheels.glob("*.whl") if p.name.lower().startswith(req.wheel_prefix))
    return found[0] if found else None


# -- the plan --------------------------------------------------------------------------------------------------
def plan_files(reqs: list[Requirement], model_name: str, fold: str, carry_checkpoint: bool) -> list[str]:
    """Paths under ``.gpucheck/`` the preparation produces (wheel file names as ``<prefix>*.whl``)."""
    files = [f"wheels/{r.wheel_prefix}*.whl" for r in reqs]
    files += [f"model/{model_name}/{f}" for f in MODEL_FILES]
    if carry_checkpoint:
        files.append(f"model/{model_name}/fold_{fold}/checkpoint_final.pth")
    return [*files, "manifest.json"]


# -- payload -------------------------------------------------------------------------------------------------
def _walk(root: Path, skip: set[Path]) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if d not in EXCLUDED_DIRS and here / d not in skip]
        out += [here / f for f in filenames if not (here / f).is_symlink()]
    return out


def repo_files(root: Path, carry: list[Path]) -> list[Path]:
    """What travels besides the carried folders: with git, the tracked and untracked-not-ignored files;
    without (a copied tree on the device machine), every file except caches and the carried folders."""
    try:
        out = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "-co", "--exclude-standard"],
                             capture_output=True, check=True, timeout=60).stdout
        files = [root / f for f in out.decode().split("\0") if f]
    except (OSError, subprocess.SubprocessError):
        return _walk(root, {c.resolve() for c in carry})
    carried = [c.resolve() for c in carry]
    return [f for f in files if f.is_file() and not any(c in f.resolve().parents for c in carried)]


def _size(paths) -> int:
    return sum(p.stat().st_size for p in paths if p.is_file())


def payload(root: Path, carry: list[Path]) -> dict:
    repo = _size(repo_files(root, carry))
    carried = {str(c.relative_to(root) if c.is_relative_to(root) else c): _size(_walk(c, set())) if c.is_dir() else 0
               for c in carry}
    total = repo + sum(carried.values())
    return {"repo_bytes": repo, "carried_bytes": carried, "total_bytes": total, "limit_bytes": LIMIT_BYTES}


def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def check_payload(p: dict) -> str:
    """One line describing the payload; raises :class:`PayloadError` when it is over the limit."""
    parts = ", ".join(f"{k} {mib(v)}" for k, v in p["carried_bytes"].items())
    line = (f"payload {mib(p['total_bytes'])} of {mib(p['limit_bytes'])}: repository {mib(p['repo_bytes'])}"
            + (f", {parts}" if parts else ""))
    if p["total_bytes"] > p["limit_bytes"]:
        raise PayloadError(f"{line} — OVER the limit: drop files from the repository or re-run "
                           "bench/gpu_prepare.py --model bundle (rebuilds the checkpoint there instead of carrying it)")
    return line


# -- preparation -----------------------------------------------------------------------------------------------
def _pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise PayloadError(f"{' '.join(cmd)} failed:\n{res.stderr.strip()[-2000:]}")


def download(req: Requirement, wheels: Path, tmp: Path) -> Path:
    """The wheel of ``req`` in ``wheels`` (downloaded or built once)."""
    have = wheel_for(req, wheels)
    if have:
        return have
    spec = f"{req.name}=={req.version}"
    if req.sdist:
        tmp.mkdir(parents=True, exist_ok=True)
        _pip("download", "-q", "--no-deps", "--no-binary=:all:", "-d", str(tmp), spec)
        sdist = next(p for p in tmp.iterdir() if p.name.lower().startswith(req.wheel_prefix.rstrip("-")))
        _pip("wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(sdist))
    else:
        platforms = [a for plat in PLATFORMS for a in ("--platform", plat)]
        _pip("download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", PYTHON_VERSION,
             "--implementation", "cp", *platforms, "-d", str(wheels), spec)
    got = wheel_for(req, wheels)
    if got is None:
        raise PayloadError(f"{spec}: pip produced no wheel named {req.wheel_prefix}*.whl in {wheels}")
    return got


def decide_checkpoint(mode: str, repo_bytes: int, other_bytes: int, checkpoint_bytes: int) -> bool:
    """Carry the checkpoint? ``auto``: when everything fits with :data:`MARGIN_BYTES` to spare."""
    if mode in ("checkpoint", "bundle"):
        return mode == "checkpoint"
    return repo_bytes + other_bytes + checkpoint_bytes <= LIMIT_BYTES - MARGIN_BYTES


def prepare(root: Path, model_dir: Path, fold: str, mode: str, reqs: list[Requirement]) -> dict:
    dest = root / DEST
    wheels = dest / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    wanted = {req.wheel_prefix for req in reqs}
    for stale in wheels.glob("*.whl"):  # two versions of one package would stop the install there
        if not any(stale.name.lower().startswith(w) for w in wanted):
            log.info("removing %s (not in %s)", stale.name, WHEELS_LIST.name)
            stale.unlink()
    got = [download(r, wheels, dest / "sdist") for r in reqs]
    shutil.rmtree(dest / "sdist", ignore_errors=True)
    model_out = dest / "model" / model_dir.name
    if model_out.exists():
        shutil.rmtree(model_out)
    (model_out / f"fold_{fold}").mkdir(parents=True)
    for name in MODEL_FILES:
        shutil.copyfile(model_dir / name, model_out / name)
    ckpt = model_dir / f"fold_{fold}" / "checkpoint_final.pth"
    if not ckpt.is_file():
        raise PayloadError(f"{ckpt}: checkpoint not found")
    repo_bytes = _size(repo_files(root, [dest]))
    carry = decide_checkpoint(mode, repo_bytes, _size(got) + _size(model_out.rglob("*.json")), ckpt.stat().st_size)
    if carry:
        shutil.copyfile(ckpt, model_out / f"fold_{fold}" / ckpt.name)
    files = sorted(p for p in dest.rglob("*") if p.is_file() and p.name != "manifest.json")
    manifest = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": PYTHON_VERSION, "platforms": list(PLATFORMS),
        "requirements": [f"{r.name}=={r.version}" for r in reqs],
        "model": {"name": model_dir.name, "fold": fold, "checkpoint": "carried" if carry else "rebuild",
                  "source": str(model_dir), "checkpoint_bytes": ckpt.stat().st_size},
        "files": [{"path": str(f.relative_to(dest)), "bytes": f.stat().st_size, "sha256": file_sha256(f)} for f in files],
    }
    with open(dest / "manifest.json", "w") as f:
        json.dump(manifest, f, indent=1)
    manifest["payload"] = payload(root, [dest])
    with open(dest / "manifest.json", "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


def verify(root: Path) -> list[str]:
    """Problems of a prepared folder against its manifest (missing or changed files)."""
    dest = root / DEST
    try:
        manifest = json.loads((dest / "manifest.json").read_text())
    except (OSError, ValueError) as exc:
        return [f"{dest / 'manifest.json'}: {exc}; run bench/gpu_prepare.py where the registry is reachable"]
    problems = []
    for entry in manifest["files"]:
        f = dest / entry["path"]
        if not f.is_file():
            problems.append(f"{f}: missing")
        elif f.stat().st_size != entry["bytes"] or file_sha256(f) != entry["sha256"]:
            problems.append(f"{f}: differs from the manifest")
    return problems


def main(argv=None) -> int:
    from flare_rt.resources import shared_models_dir

    p = argparse.ArgumentParser(description="Prepare .gpucheck/ for bench/gpu_check.sh (see the module docstring)")
    p.add_argument("--root", type=Path, default=REPO, help="repository root (default: this checkout)")
    p.add_argument("--model-dir", type=Path, default=shared_models_dir() / "ts_demo_small_nnunet")
    p.add_argument("--fold", default="0")
    p.add_argument("--model", choices=["auto", "checkpoint", "bundle"], default="auto",
                   help="carry the checkpoint, or let the check rebuild it from the packaged bundle (auto: carry "
                        "if it fits with a margin)")
    p.add_argument("--list", action="store_true", help="print the files it would produce and exit")
    p.add_argument("--check-payload", action="store_true",
                   help="only check the payload size (and the prepared folder against its manifest)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    root = args.root.resolve()
    try:
        if args.check_payload:
            sys.stdout.write(check_payload(payload(root, [root / DEST])) + "\n")
            problems = verify(root)
            if problems:
                raise PayloadError("prepared folder incomplete: " + "; ".join(problems[:5]))
            return 0
        reqs = parse_requirements()
        if args.list:
            carry = args.model != "bundle"
            sys.stdout.write("\n".join(f"{DEST}/{f}" for f in plan_files(reqs, args.model_dir.name, args.fold, carry))
                             + "\n")
            return 0
        manifest = prepare(root, args.model_dir, args.fold, args.model, reqs)
        line = check_payload(manifest["payload"])
    except (PayloadError, ValueError, OSError) as exc:
        sys.stderr.write(f"gpu_prepare: {exc}\n")
        return 1
    sys.stdout.write(f"{DEST}: {len(manifest['files'])} files, checkpoint {manifest['model']['checkpoint']}; {line}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
