"""``flare-rt pipeline run|status``: the pseudo-label pipeline from the command line.

``register(subparsers)`` adds the subcommand to the flare-rt CLI (one line in ``cli.build_parser``)."""
from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path

log = logging.getLogger(__name__)

DESCRIPTION = """\
Run the paper's hierarchy of pseudo-labelling stages (or your own definition) over a dataset: each stage
pseudo-labels the classes its cases miss with an earlier stage's model, through the inference runtime,
merges them into the annotations (annotated voxels never change) and trains a model on the result.
CONFIG is a definition JSON or a packaged one: 'paper' (the five stages of the FLARE23 paper, for a
FLARE23 or nnU-Net folder) or 'demo' (the CTs of flare-rt's shared test data, sized for a CPU).
Re-running skips finished stages and resumes an interrupted one; 'status' shows where a run stands.
"""


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("pipeline", help="the multi-stage pseudo-label training pipeline",
                                   description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="pipeline_command", required=True)
    r = sub.add_parser("run", help="run (or continue) a pipeline definition")
    r.add_argument("config", metavar="CONFIG", help="definition JSON, or a packaged definition: paper, demo")
    r.add_argument("--dataset", type=Path, required=True, help="dataset folder (FLARE23 / nnU-Net layout, or the "
                                                                "folder the definition's case paths are relative to)")
    r.add_argument("--work", type=Path, required=True, help="work folder: labels, models, state, report")
    r.add_argument("--hold-out", action="append", default=[], metavar="CASE",
                   help="leave this case out of the dataset (repeatable), e.g. to evaluate the result on it")
    r.add_argument("--backend", default="auto", help="pseudo-labelling backend: auto or one of flare-rt segment's backends")
    r.add_argument("--device", default="auto", help="pseudo-labelling device: auto, cpu, cuda")
    r.add_argument("--threads", type=int, default=None, help="CPU threads per pseudo-labelling worker")
    r.add_argument("--workers", type=int, default=1, help="pseudo-labelling workers (with --ray on CPUs)")
    r.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="fan pseudo-labelling out over Ray: a local instance (no ADDRESS) or a cluster "
                        "('auto' or host:port); one actor per GPU, or --workers CPU actors")
    r.add_argument("--train-threads", type=int, default=None, help="torch CPU threads of training")
    r.add_argument("--train-workers", type=int, default=None, help="data-loading processes of training")
    r.add_argument("--keep-caches", action="store_true", help="keep each stage's preprocessing cache")
    r.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    r.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    r.set_defaults(func=cmd_run)
    s = sub.add_parser("status", help="show the stages of a run and where it stands")
    s.add_argument("--work", type=Path, required=True)
    s.add_argument("-q", "--quiet", action="store_true")
    s.add_argument("-v", "--verbose", action="store_true")
    s.set_defaults(func=cmd_status)
    return parser


def cmd_run(args: argparse.Namespace) -> int:
    from ..errors import BackendUnavailableError
    from .definition import load_definition
    from .pseudolabel import FanOut
    from .runner import RunOptions, run_pipeline

    try:
        import torch  # noqa: F401
    except ImportError as exc:
        raise BackendUnavailableError("flare-rt pipeline trains models and needs PyTorch: "
                                      "pip install 'flare-rt[train]'") from exc
    definition = load_definition(args.config)
    options = RunOptions(hold_out=tuple(args.hold_out), backend=args.backend, device=args.device,
                         threads=args.threads, fan=FanOut(args.workers, args.ray), train_threads=args.train_threads,
                         train_workers=args.train_workers, keep_caches=args.keep_caches, progress=not args.quiet)
    summary = run_pipeline(definition, args.dataset, args.work, options)
    sys.stdout.write(f"model: {summary['model']} (the {summary['final_stage']} model); report: "
                     f"{Path(args.work) / 'report.md'}\n")
    return 0


def status_lines(work: Path) -> list[str]:
    """One line per stage: status, cases, time, validation Dice, training progress of a running stage."""
    from ..errors import ConfigError
    from .report import collect, mean_dice

    run, definition, states = collect(work)
    if not definition:
        raise ConfigError(f"{work}: no pipeline run here (no definition.json); start one with 'flare-rt pipeline run'")
    lines = [f"pipeline {definition['name']} in {work}: "
             + (f"finished {run['finished']}, model {run['model']}" if run.get("finished") else "not finished")]
    if run.get("hold_out"):
        lines.append(f"held out: {', '.join(run['hold_out'])}")
    for s in states:
        status = s.get("status", "pending")
        parts = [f"{s['stage']:<10} {status:<8}"]
        if s.get("reason"):
            parts.append(s["reason"])
        if status == "running":
            progress = Path(work) / "stages" / s["stage"] / "train" / "progress.csv"
            epochs = max(0, len(progress.read_text().splitlines()) - 1) if progress.is_file() else 0
            total = (s.get("budget") or {}).get("epochs")
            parts.append(f"training epoch {epochs}/{total or '?'} done")
        if status == "done":
            dice = mean_dice(s.get("val_dice", {}))
            parts.append(f"{len(s.get('train_cases', []))} training cases, {len(s.get('pseudo_labelled', {}))} "
                         f"pseudo-labelled, {((s.get('pseudo_seconds') or 0) + (s.get('train_seconds') or 0)) / 60:.1f} "
                         f"min, validation Dice {'–' if math.isnan(dice) else f'{dice:.3f}'}, model "
                         f"{s.get('model_sha256', '')[:12]}")
        lines.append("  ".join(parts))
    return lines


def cmd_status(args: argparse.Namespace) -> int:
    sys.stdout.write("\n".join(status_lines(args.work)) + "\n")
    return 0
