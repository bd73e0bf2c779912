"""Atomic file writes: write to a temporary name beside the target, rename over it on success.

The temporary name is unique per process and call (several workers may write into one folder at
once) and keeps the target's suffix, so format-by-extension writers (SimpleITK, numpy, matplotlib)
still pick the right format. A failed write leaves neither a partial file nor the temporary one.
"""
from __future__ import annotations

import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

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


@contextmanager
def atomic_path(path: str | Path, mkdir: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write; on a clean exit it replaces ``path`` atomically (same folder,
    same file system), on an exception it is removed and ``path`` is left as it was."""
    path = Path(path)
    if mkdir:
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def is_temporary(path: Path) -> bool:
    """True for names made by :func:`temporary_name` (e.g. to ignore them when listing outputs)."""
    return path.name.startswith(".") and ".partial" in path.name
