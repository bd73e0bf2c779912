"""Several workers on one output folder: a case is claimed before it is segmented.

A claim is an exclusive ``flock`` on a lock file in the output folder's hidden state folder
(``OUT/.flare-rt/<case>.lock``), held while the case is processed. The kernel drops the lock when its process dies, so the claim of a crashed worker
is taken over by the next worker that asks, with no stale-lock clean-up. After taking the lock a
worker checks that the lock file is still the one on disk (another worker may have removed it on
release) and that the output does not exist yet (another worker may have finished it), so each case
is written once. A case that failed leaves a ``<case>.failed`` record; a concurrent worker (one
that started before the failure, or while the failing worker still runs) does not retry it, a later
run does. Each worker registers itself (a held lock on ``workers/<id>``); the last worker to leave
removes the state folder, so a finished output folder holds the outputs only.

POSIX only (``fcntl``); works on local file systems and on NFS v4 (Linux maps ``flock`` to POSIX
locks there).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .atomic import atomic_path
from .errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerId:
    pid: int
    host: str
    started: float  # time.time() at the worker's start

    @classmethod
    def current(cls, started: float | None = None) -> "WorkerId":
        return cls(os.getpid(), socket.gethostname(), time.time() if started is None else started)

    def alive(self) -> bool:
        """Whether this worker still runs (known only on the same host; elsewhere assumed alive)."""
        if self.host != socket.gethostname():
            return True
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # exists, owned by another user
            return True
        return True


@dataclass(frozen=True)
class Failure:
    reason: str
    worker: WorkerId


def _fcntl():
    try:
        import fcntl
    except ImportError as exc:  # pragma: no cover - Windows
        raise ConfigError("folder mode with several workers needs POSIX file locks (fcntl); run one worker per "
                          "output folder on this system") from exc
    return fcntl


class Claim:
    """An exclusive hold on one case; release it (or use ``with``) when the output is written."""

    def __init__(self, board: "ClaimBoard", name: str, fd: int):
        self.board, self.name, self._fd = board, name, fd

    def fail(self, reason: str) -> None:
        """Record that this case failed, so concurrent workers do not retry it."""
        record = {"reason": reason, "worker": asdict(self.board.worker)}
        with atomic_path(self.board.failure_path(self.name)) as tmp:
            tmp.write_text(json.dumps(record) + "\n")

    def succeed(self) -> None:
        self.board.failure_path(self.name).unlink(missing_ok=True)

    def release(self) -> None:
        if self._fd is None:
            return
        lock = self.board.lock_path(self.name)
        try:
            lock.unlink(missing_ok=True)  # while still holding the lock: waiters re-check the inode
        finally:
            _fcntl().flock(self._fd, _fcntl().LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "Claim":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class ClaimBoard:
    """The claims of one output folder, as seen by one worker (``with board:`` registers the worker)."""

    STATE = ".flare-rt"

    def __init__(self, folder: str | Path, worker: WorkerId | None = None):
        self.folder = Path(folder)
        self.state = self.folder / self.STATE
        self.worker = worker or WorkerId.current()
        self._registration: int | None = None

    def lock_path(self, name: str) -> Path:
        return self.state / f"{name}.lock"

    def failure_path(self, name: str) -> Path:
        return self.state / f"{name}.failed"

    def _worker_path(self) -> Path:
        w = self.worker
        return self.state / "workers" / f"{w.host}-{w.pid}-{w.started:.6f}"

    def __enter__(self) -> "ClaimBoard":
        path = self._worker_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._registration = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        _fcntl().flock(self._registration, _fcntl().LOCK_EX)
        return self

    def __exit__(self, *exc) -> None:
        if self._registration is None:
            return
        self._worker_path().unlink(missing_ok=True)
        os.close(self._registration)  # drops the lock
        self._registration = None
        if self.state.is_dir() and not _any_held(self.state):
            shutil.rmtree(self.state, ignore_errors=True)  # the last worker out: no live worker, no claim

    def try_claim(self, name: str) -> Claim | None:
        """The claim on ``name``, or None when a live worker holds it."""
        fcntl = _fcntl()
        path = self.lock_path(name)
        self.state.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return None
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, (json.dumps(asdict(self.worker)) + "\n").encode())
                return Claim(self, name, fd)
            # the holder released and removed the file between our open and our lock: try again
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def concurrent_failure(self, name: str) -> Failure | None:
        """A failure of ``name`` recorded by a worker running alongside this one (it started before the
        failure was recorded, or the failing worker still runs), which this worker should not retry."""
        path = self.failure_path(name)
        try:
            record = json.loads(path.read_text())
            failure = Failure(str(record["reason"]), WorkerId(**record["worker"]))
            recorded = path.stat().st_mtime
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError):
            log.warning("%s: unreadable failure record; the case will be retried", path)
            return None
        if failure.worker == self.worker:
            return failure
        if recorded >= self.worker.started or failure.worker.alive():
            return failure
        return None


def _any_held(state: Path) -> bool:
    """Whether a live worker's registration or claim is in ``state`` (failure records aside). Two workers that
    leave together may both look while one of them removes the folder: what is gone is not held (``os.walk``
    passes over a folder removed under it, where ``Path.rglob`` raised FileNotFoundError)."""
    for here, _, files in os.walk(state):
        if any(_held(Path(here) / f) for f in files if not f.endswith(".failed")):
            return True
    return False


def _held(path: Path) -> bool:
    """Whether a live process holds a lock on ``path`` (a dead one's lock is gone with it)."""
    fcntl = _fcntl()
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
