"""Content hashes: of files (a DICOM series folder: of its files in name order), remembered by path, size
and modification time so a re-run does not read every CT again; and of JSON-able values."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ..atomic import atomic_path

CHUNK = 1 << 22


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def digest(value: Any) -> str:
    """sha256 of the canonical JSON of ``value``."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


class FileHashes:
    """sha256 of files and folders, cached in a JSON file keyed by (path, size, mtime)."""

    def __init__(self, store: str | Path | None = None):
        self.store = None if store is None else Path(store)
        self._known: dict[str, list] = {}
        if self.store is not None and self.store.is_file():
            try:
                self._known = json.loads(self.store.read_text())
            except json.JSONDecodeError:
                self._known = {}

    def _file(self, path: Path) -> str:
        st = path.stat()
        key, stamp = str(path.resolve()), [st.st_size, st.st_mtime_ns]
        hit = self._known.get(key)
        if hit and hit[:2] == stamp:
            return hit[2]
        value = sha256_file(path)
        self._known[key] = [*stamp, value]
        return value

    def __call__(self, path: str | Path | None) -> str | None:
        if path is None:
            return None
        path = Path(path)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file())
            return digest([[str(p.relative_to(path)), self._file(p)] for p in files])
        return self._file(path)

    def save(self) -> None:
        if self.store is not None:
            with atomic_path(self.store) as tmp:
                tmp.write_text(json.dumps(self._known, indent=0, sort_keys=True))

