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
    seconds: float = 0.0
    tiles: int | None = None
    reason: str = ""


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


def run_folder(cases: Iterable[Case], out: Path, segment: Callable[[Case], CaseReport], overwrite: bool = False,
               board: ClaimBoard | None = None, progress=None) -> list[CaseOutcome]:
    """Segment each case this worker can claim; returns one outcome per case looked at.

    Without ``overwrite`` an existing output is kept. With it, each case is redone once by this
    worker; cooperating workers started with ``overwrite`` should use ``--part`` to split the folder,
    since a case another worker has just written cannot be told from an old output."""
    out.mkdir(parents=True, exist_ok=True)
    outcomes = []
    with board or ClaimBoard(out) as board:
        for case in cases:
            outcomes.append(_one(case, segment, overwrite, board))
            if progress is not None:
                progress(1)
    return outcomes


def _one(case: Case, segment, overwrite: bool, board: ClaimBoard) -> CaseOutcome:
    if case.output.resolve() == case.image.resolve():
        return CaseOutcome(case, FAILED, reason="output would overwrite the input")
    if case.output.exists() and not overwrite:
        return CaseOutcome(case, EXISTS)
    claim = board.try_claim(case.name)
    if claim is None:
        return CaseOutcome(case, CLAIMED)
    with claim:
        if case.output.exists() and not overwrite:  # finished by another worker while we looked
            return CaseOutcome(case, EXISTS)
        earlier = board.concurrent_failure(case.name)
        if earlier is not None:
            return CaseOutcome(case, FAILED_ELSEWHERE, reason=earlier.reason)
        t0 = time.perf_counter()
        try:
            report = segment(case)
        except FlareError as exc:
            reason = str(exc)
            log.error("%s", reason)
        except Exception as exc:  # keep going: one broken case must not stop the batch
            log.exception("%s: unexpected error", case.image)
            reason = f"unexpected {type(exc).__name__}: {exc}"
        else:
            claim.succeed()
            return CaseOutcome(case, DONE, time.perf_counter() - t0, report.tiles)
        claim.fail(reason)
        return CaseOutcome(case, FAILED, time.perf_counter() - t0, reason=reason)


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
    counts = {s: sum(o.status == s for o in outcomes) for s in (DONE, EXISTS, CLAIMED, FAILED, FAILED_ELSEWHERE)}
    lines.append(", ".join(f"{n} {s}" for s, n in counts.items() if n) or "no cases")
    return "\n".join(lines)
