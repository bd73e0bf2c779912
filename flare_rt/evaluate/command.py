"""``flare-rt evaluate PRED GT``: the FLARE DSC/NSD of a folder (or file) of predictions.

``register(subparsers)`` adds the subcommand to the flare-rt CLI; ``python -m
flare_rt.evaluate.command PRED GT ...`` runs it on its own.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from flare_rt.evaluate import evaluate_folders
from flare_rt.evaluate.metrics import DEFAULT_DSC_CUTOFF, FLARE23_DSC_CUTOFF, EvaluationOptions
from flare_rt.evaluate.report import check_report_folder, render_markdown, write_report

log = logging.getLogger(__name__)

DESCRIPTION = """\
Score predictions against ground truth with the FLARE23 DSC and NSD, computed as the official
challenge script does (per-class NSD tolerances, GT z-range cut of aorta, IVC and oesophagus,
NSD = 0 when DSC < 0.2, spacing from the GT header, values rounded to 4 decimals, organ mean over
the 13 organ means, tumour apart). PRED and GT are two folders, cases matched by file name
(case.nii.gz), or two files. A ground-truth case without a prediction is scored as an empty
prediction; a prediction folder that matches no case at all is refused. Writes scores.csv, summary.md and plots/ to --out; prints the summary.
"""


def default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pred", type=Path, metavar="PRED", help="prediction folder or file")
    parser.add_argument("gt", type=Path, metavar="GT", help="ground-truth folder or file")
    parser.add_argument(
        "--out", type=Path, metavar="DIR",
        help="write scores.csv, summary.md and plots/boxplot_<id>_<class>.png here",
    )
    parser.add_argument(
        "--flare23-cutoff", action="store_true",
        help=f"NSD = 0 when DSC < {FLARE23_DSC_CUTOFF:g} (the FLARE23 challenge script) instead "
        f"of {DEFAULT_DSC_CUTOFF:g}",
    )
    parser.add_argument(
        "--inclusive-zrange", action="store_true",
        help="cut aorta, IVC and oesophagus to the full GT z-range; the official script's slice "
        "[z_min:z_max] drops the top GT slice, which the default reproduces",
    )
    parser.add_argument(
        "--resample-pred", action="store_true",
        help="resample a prediction whose grid differs from the GT onto the GT grid (nearest "
        "neighbour, physical space) instead of failing",
    )
    parser.add_argument(
        "--workers", type=int, default=default_workers(), metavar="N",
        help="cases scored in parallel processes (default: %(default)s)",
    )
    parser.add_argument("--no-plots", action="store_true", help="do not write the box plots")


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``evaluate`` subcommand; its ``func(args)`` returns the exit code."""
    parser = subparsers.add_parser(
        "evaluate", help="FLARE DSC/NSD of predictions against ground truth",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Evaluate, write the outputs, print the summary (typed errors go to ``cli.run_command``)."""
    options = EvaluationOptions(
        dsc_cutoff=FLARE23_DSC_CUTOFF if args.flare23_cutoff else DEFAULT_DSC_CUTOFF,
        inclusive_zrange=args.inclusive_zrange,
    )
    if args.out is not None:
        check_report_folder(args.out)  # before the scoring, which takes minutes on a full test set
    evaluation = evaluate_folders(args.pred, args.gt, options, workers=args.workers, resample_pred=args.resample_pred)
    markdown = render_markdown(evaluation.summary, options)
    if args.out is not None:
        written = write_report(evaluation.results, evaluation.summary, options, args.out, plots=not args.no_plots)
        log.info("wrote %s", ", ".join(str(p) for p in written.values()))
    sys.stdout.write(markdown)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from flare_rt.cli import run_command, setup_logging

    setup_logging()
    parser = argparse.ArgumentParser(
        prog="flare-rt evaluate", description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    return run_command(run, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
