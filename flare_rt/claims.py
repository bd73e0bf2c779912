"""Several workers on one output folder: a case is claimed before it is segmented.

A claim is an exclusive ``flock`` on a lock file in the output folder's hidden state folder
(``OUT/.flare-rt/<case>.lock``), held while the case is processed. The kernel drops the lock when its
process dies, so the claim of a crashed worker is taken over by the next worker that asks, with no
stale-lock clean-up. After taking the lock a worker checks that the lock file is still the one on disk
(another worker may have removed it on release) and that the output does not exist yet (another worker
may have finished it), so each case is written once. A case that failed leaves a ``<case>.failed``
record; a concurrent worker (one that started before the failure, or while the failing worker still
runs) does not retry it, a later run does.

Each worker registers itself for its whole run with a *shared* lock on ``OUT/.flare-rt/board.lock``, and
claims only while registered. The last worker out removes the state folder, so a finished output folder
holds the outputs only: a leaving worker that gets the *exclusive* lock on ``board.lock`` knows no other
worker is registered, and while it holds that lock none can register. It renames the state folder to a
unique name, drops the lock, then removes the renamed folder. A worker that arrives meanwhile waits for
the lock, sees that the file it locked is no longer the one on disk, and registers in a new state folder.
So no worker can lose its registration, claims or failure records to another's clean-up.

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
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from .atomic import atomic_path
from .errors import ConfigError, OutputError

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
    BOARD = "board.lock"

    def __init__(self, folder: str | Path, worker: WorkerId | None = None):
        self.folder = Path(folder)
        self.state = self.folder / self.STATE
        self.worker = worker or WorkerId.current()
        self._registration: int | None = None

    def lock_path(self, name: str) -> Path:
        return self.state / f"{name}.lock"

    def failure_path(self, name: str) -> Path:
        return self.state / f"{name}.failed"

    @property
    def board_path(self) -> Path:
        return self.state / self.BOARD

    def __enter__(self) -> "ClaimBoard":
        fcntl = _fcntl()
        while True:  # until the board file this worker holds is the one on disk
            try:
                self.state.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.board_path, os.O_CREAT | os.O_RDWR, 0o644)
            except (FileExistsError, FileNotFoundError):  # the last worker out removed the folder as we made it
                if self.state.exists() and not self.state.is_dir():
                    raise OutputError(f"{self.state}: a file where folder mode keeps its state (a folder); remove "
                                      "or rename it") from None
                continue
            fcntl.flock(fd, fcntl.LOCK_SH)  # waits while the last worker out removes the folder
            if _same_file(fd, self.board_path):
                self._registration = fd
                return self
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __exit__(self, *exc) -> None:
        fd, self._registration = self._registration, None
        if fd is None:
            return
        fcntl = _fcntl()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # another worker is registered: it, or the last after it, cleans up
            os.close(fd)
            return
        try:
            # the board file may be gone: a worker that left just before this one removed the folder
            retired = _same_file(fd, self.board_path) and _retire_state(self.state)
        finally:
            os.close(fd)  # drops the lock: a worker waiting to register starts a new state folder
        if retired:
            _remove_retired(self.state)

    def try_claim(self, name: str) -> Claim | None:
        """The claim on ``name``, or None when a live worker holds it (the worker must be registered)."""
        if self._registration is None:
            raise RuntimeError("ClaimBoard.try_claim outside `with board:`: register the worker first, so that "
                               "no other worker removes the state folder while this one holds a claim")
        fcntl = _fcntl()
        path = self.lock_path(name)
        while True:
            fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return None
            if _same_file(fd, path):
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


def _same_file(fd: int, path: Path) -> bool:
    """Whether the open file ``fd`` is still the file at ``path`` (not removed or replaced since it was opened)."""
    try:
        disk = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (disk.st_dev, disk.st_ino)


def _retire_state(state: Path) -> bool:
    """Rename the state folder away, as the last worker out (holding ``board.lock`` exclusively): the rename is
    atomic, so a worker arriving from then on creates a new state folder instead of writing into this one."""
    try:
        os.rename(state, state.with_name(f"{state.name}{_RETIRED}{uuid.uuid4().hex}"))
    except FileNotFoundError:
        return False
    return True


def _remove_retired(state: Path) -> None:
    """Remove the renamed state folders: this worker's, and any left by a worker that died before removing its
    own (no worker uses a renamed one)."""
    for old in state.parent.glob(f"{state.name}{_RETIRED}*"):
        shutil.rmtree(old, ignore_errors=True)


_RETIRED = ".removing-"
