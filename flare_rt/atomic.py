"""Atomic file writes: write to a temporary name beside the target, rename over it on success.

The temporary name is unique per process and call (several workers may write into one folder at
once) and keeps the target's suffix, so format-by-extension writers (SimpleITK, numpy, matplotlib)
still pick the right format. A failed write leaves neither a partial file nor the temporary one.
"""
from __future__ import annotations

import errno
import os
import secrets
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import OutputError

#: Multi-part suffixes kept whole on the temporary name.
_DOUBLE_SUFFIXES = (".nii.gz", ".tar.gz")


def split_suffix(path: Path) -> tuple[str, str]:
    """``case.nii.gz`` → (``case``, ``.nii.gz``); ``model.onnx`` → (``model``, ``.onnx``)."""
    name = path.name
    for double in _DOUBLE_SUFFIXES:
        if name.lower().endswith(double):
            return name[: -len(double)], name[-len(double):]
    return path.stem, path.suffix


def temporary_name(path: Path) -> Path:
    """A hidden name beside ``path``, unique to this process and call, with ``path``'s suffix."""
    stem, suffix = split_suffix(path)
    return path.with_name(f".{stem}.{os.getpid()}-{secrets.token_hex(4)}.partial{suffix}")


def cannot_write(path: Path, exc: OSError) -> OutputError:
    return OutputError(f"{path}: cannot write ({exc.strerror or exc}); choose another output location or make "
                       "it writable")


def check_writable(folder: str | Path) -> Path:
    """Prove, before any work whose result would go there, that files can be made in ``folder`` (or, where
    it does not exist yet, in the nearest folder above it, where it would be made): a file is created and
    removed there, so nothing is left behind; :class:`OutputError` otherwise."""
    folder = Path(folder)
    existing = folder.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, f"{existing} is not a folder")
        fd, probe = tempfile.mkstemp(prefix=".flare-rt-write-test.", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise cannot_write(folder, exc) from exc
    return folder


def check_new_outputs(paths, overwrite: bool, sources=()) -> list[Path]:
    """Before any work whose result would go to ``paths``: refuse an output that is one of ``sources``
    (however spelled), a folder, or an existing file unless ``overwrite``, and prove each output folder
    writable (:func:`check_writable`); :class:`OutputError` naming the path otherwise."""
    paths = [Path(p) for p in paths]
    inputs = {Path(s).resolve() for s in sources}
    for path in paths:
        if path.resolve() in inputs:
            raise OutputError(f"{path}: output would overwrite the input; choose another output path")
        if path.is_dir():
            raise OutputError(f"{path}: is a folder; give the output file's name")
        if path.exists() and not overwrite:
            raise OutputError(f"{path}: exists; pass --overwrite to replace it")
    for folder in dict.fromkeys(p.parent for p in paths):
        check_writable(folder)
    return paths


@contextmanager
def atomic_path(path: str | Path, mkdir: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write; on a clean exit it replaces ``path`` atomically (same folder,
    same file system), on an exception it is removed and ``path`` is left as it was. An operating-system
    error while writing becomes an :class:`OutputError` naming ``path``."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        if mkdir:
            path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        raise cannot_write(path, exc) from exc
    finally:
        if tmp.exists():
            tmp.unlink()


@contextmanager
def atomic_files(path: str | Path) -> Iterator[Path]:
    """For formats written as a header that names its data file (``.mhd``, ``.nhdr``), where a temporary
    name would stay inside the header: yield ``path``'s own name in a hidden temporary folder beside it;
    on a clean exit the files written there are moved beside ``path``, ``path`` itself last (so no header
    is there without its data), on an exception the folder is removed and nothing is moved."""
    path = Path(path)
    folder = temporary_name(path.with_name(split_suffix(path)[0]))
    try:
        folder.mkdir(parents=True)
        target = folder / path.name
        yield target
        for written in sorted(folder.iterdir(), key=lambda f: f.name == path.name):
            os.replace(written, path.with_name(written.name))
    except OSError as exc:
        raise cannot_write(path, exc) from exc
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def is_temporary(path: Path) -> bool:
    """True for names made by :func:`temporary_name` (e.g. to ignore them when listing outputs)."""
    return path.name.startswith(".") and ".partial" in path.name
