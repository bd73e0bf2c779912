"""Folder mode: every ``<case>_0000.nii.gz`` of a folder → ``<case>.nii.gz`` (the FLARE naming),
shared between any number of cooperating workers and statically shardable (``--part I/N``).

The strategy knows nothing about models: it takes a ``segment(case) -> CaseReport`` callable, so it is
tested with a trivial one. One broken case never stops the others; the summary says what happened to
each case this worker looked at.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from .claims import ClaimBoard
from .errors import ConfigError, FlareError

log = logging.getLogger(__name__)

CASE_SUFFIX = "_0000.nii.gz"
OUTPUT_SUFFIX = ".nii.gz"

# statuses of one case, as this worker saw it
DONE, FAILED, EXISTS, CLAIMED, FAILED_ELSEWHERE = "done", "failed", "exists", "claimed", "failed elsewhere"


@dataclass(frozen=True)
class Case:
    name: str
    image: Path
    output: Path


@dataclass(frozen=True)
class CaseReport:
    """What segmenting one case gave (``tiles`` and stage timings are for the summary)."""

    tiles: int = 0
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class CaseOutcome:
    case: Case
    status: str
    seconds: float = 0.0  # from the start of its compute to the end of its write
    tiles: int | None = None
    reason: str = ""
    timings: dict[str, float] = field(default_factory=dict)  # stage seconds of a case segmented here


def is_case_folder(path: Path) -> bool:
    return path.is_dir() and any(path.glob(f"*{CASE_SUFFIX}"))


def parse_part(text: str | None) -> tuple[int, int]:
    """``"2/4"`` → (2, 4): this worker takes the 2nd of 4 static shards (1-based, as ``--part``)."""
    if text is None:
        return 1, 1
    i, sep, n = text.partition("/")
    try:
        part, parts = int(i), int(n)
    except ValueError:
        part = parts = 0
    if not sep or parts < 1 or not 1 <= part <= parts:
        raise ConfigError(f"--part takes I/N with 1 <= I <= N (e.g. 1/4), got {text!r}")
    return part, parts


def list_cases(src: Path, dst: Path, part: tuple[int, int] = (1, 1)) -> list[Case]:
    """The cases of ``src`` in name order; with ``part=(i, n)`` every n-th case starting at the i-th."""
    images = sorted(p for p in src.glob(f"*{CASE_SUFFIX}") if p.is_file() or p.is_symlink())
    cases = [Case(p.name[: -len(CASE_SUFFIX)], p, dst / (p.name[: -len(CASE_SUFFIX)] + OUTPUT_SUFFIX))
             for p in images]
    i, n = part
    return cases[i - 1::n]


def other_images(src: Path) -> list[str]:
    """Image files in ``src`` that folder mode does not take (not named ``*_0000.nii.gz``), e.g. a second
    channel ``*_0001.nii.gz`` or a case named without the channel suffix."""
    from .io import image_suffix

    return sorted(p.name for p in src.iterdir()
                  if image_suffix(p) and not p.name.endswith(CASE_SUFFIX) and not p.name.startswith("."))


@dataclass(frozen=True)
class CaseStages:
    """How one case is segmented, in three steps that folder mode overlaps: ``read`` (the next case is read
    and decompressed on a thread while the current one computes), ``compute`` (on the caller's thread: the
    GPU's), ``write`` (compression and writing on a thread, behind the next case's compute)."""

    read: Callable[[Case], object]
    compute: Callable[[Case, object], object]
    write: Callable[[Case, object, object], CaseReport]

    @classmethod
    def single(cls, segment: Callable[[Case], CaseReport]) -> "CaseStages":
        """One callable doing everything (in the compute step)."""
        return cls(read=lambda case: None, compute=lambda case, _: segment(case), write=lambda case, _, r: r)


def _fail_reason(exc: BaseException, case: Case) -> str:
    if isinstance(exc, FlareError):
        log.error("%s", exc)
        return str(exc)
    log.error("%s: unexpected error", case.image, exc_info=exc)
    return f"unexpected {type(exc).__name__}: {exc}"


def run_folder(cases: Iterable[Case], out: Path, stages: CaseStages | Callable[[Case], CaseReport],
               overwrite: bool = False, board: ClaimBoard | None = None, progress=None) -> list[CaseOutcome]:
    """Segment each case this worker can claim; returns one outcome per case looked at, in case order.

    Reading the next case and writing the previous one overlap with the current case's compute (one
    reader and one writer thread); a failed read or write fails that case only.

    Without ``overwrite`` an existing output is kept. With it, each case is redone once by this
    worker; cooperating workers started with ``overwrite`` should use ``--part`` to split the folder,
    since a case another worker has just written cannot be told from an old output."""
    from concurrent.futures import ThreadPoolExecutor

    stages = stages if isinstance(stages, CaseStages) else CaseStages.single(stages)
    out.mkdir(parents=True, exist_ok=True)
    cases = list(cases)
    outcomes: dict[int, CaseOutcome] = {}

    def done(i: int, outcome: CaseOutcome) -> None:
        outcomes[i] = outcome
        if progress is not None:
            progress(1)

    with board or ClaimBoard(out) as board, ThreadPoolExecutor(1, "flare-read") as reader, \
            ThreadPoolExecutor(1, "flare-write") as writer:
        pending = iter(enumerate(cases))

        def claim_next():
            """The next case this worker claims, its read started; cases it skips get their outcome."""
            for i, case in pending:
                claim_or_outcome = _claim(case, overwrite, board)
                if isinstance(claim_or_outcome, CaseOutcome):
                    done(i, claim_or_outcome)
                    continue
                return i, case, claim_or_outcome, reader.submit(stages.read, case)
            return None

        written: dict[int, float] = {}  # case index -> when its write ended (on the writer thread)

        def write(i, case, data, result) -> CaseReport:
            try:
                return stages.write(case, data, result)
            finally:
                written[i] = time.perf_counter()

        def finish_write(i, case, claim, t0, future) -> None:
            # a case's time runs from its compute to the end of its own write, not to the moment it is
            # collected here (after the next case's compute)
            try:
                report = future.result()
            except Exception as exc:  # noqa: BLE001 - the case fails, the batch goes on
                reason = _fail_reason(exc, case)
                claim.fail(reason)
                done(i, CaseOutcome(case, FAILED, written[i] - t0, reason=reason))
            else:
                claim.succeed()
                done(i, CaseOutcome(case, DONE, written[i] - t0, report.tiles, timings=dict(report.timings)))
            finally:
                claim.release()

        writing = None
        nxt = claim_next()
        while nxt is not None:
            i, case, claim, read = nxt
            nxt = claim_next()  # its read runs while this case computes
            t0 = time.perf_counter()
            try:
                data = read.result()
                result = stages.compute(case, data)
            except Exception as exc:  # noqa: BLE001 - the case fails, the batch goes on
                reason = _fail_reason(exc, case)
                claim.fail(reason)
                claim.release()
                done(i, CaseOutcome(case, FAILED, time.perf_counter() - t0, reason=reason))
                continue
            if writing is not None:
                finish_write(*writing)  # at most one write behind: bounded memory
            writing = (i, case, claim, t0, writer.submit(write, i, case, data, result))
        if writing is not None:
            finish_write(*writing)
    return [outcomes[i] for i in sorted(outcomes)]


def _claim(case: Case, overwrite: bool, board: ClaimBoard):
    """The claim on ``case``, or the outcome when this worker does not segment it."""
    if case.output.resolve() == case.image.resolve():
        return CaseOutcome(case, FAILED, reason="output would overwrite the input")
    if case.output.exists() and not overwrite:
        return CaseOutcome(case, EXISTS)
    claim = board.try_claim(case.name)
    if claim is None:
        return CaseOutcome(case, CLAIMED)
    if case.output.exists() and not overwrite:  # finished by another worker while we looked
        claim.release()
        return CaseOutcome(case, EXISTS)
    earlier = board.concurrent_failure(case.name)
    if earlier is not None:
        claim.release()
        return CaseOutcome(case, FAILED_ELSEWHERE, reason=earlier.reason)
    return claim


def summary_table(outcomes: list[CaseOutcome]) -> str:
    """A plain-text table: case, seconds, tiles, status (failures with their reason below it)."""
    rows = [("case", "time s", "tiles", "status")]
    for o in outcomes:
        rows.append((o.case.name, f"{o.seconds:.1f}" if o.status in (DONE, FAILED) else "-",
                     str(o.tiles) if o.tiles is not None else "-", o.status))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) if i in (0, 3) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(", ".join(f"{n} {s}" for s, n in status_counts(outcomes).items() if n) or "no cases")
    return "\n".join(lines)


def status_counts(outcomes: list[CaseOutcome]) -> dict[str, int]:
    """How many cases ended in each status (every status, zeros included, in a fixed order)."""
    return {s: sum(o.status == s for o in outcomes) for s in (DONE, EXISTS, CLAIMED, FAILED, FAILED_ELSEWHERE)}


def outcome_records(outcomes: list[CaseOutcome]) -> list[dict]:
    """One JSON-ready record per case: names, status, seconds, tiles and stage timings where this worker
    segmented it, the reason where it failed."""
    return [{"case": o.case.name, "image": str(o.case.image), "output": str(o.case.output), "status": o.status,
             "seconds": o.seconds if o.status in (DONE, FAILED) else None, "tiles": o.tiles,
             "timings_s": dict(o.timings), "reason": o.reason or None}
            for o in outcomes]
