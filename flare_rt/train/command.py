"""``flare-rt train CONFIG``: train a network from a JSON config (or a packaged preset) into a bundle.

``register(subparsers)`` adds the subcommand to the flare-rt CLI; ``python -m flare_rt.train.command
CONFIG ...`` runs it on its own, which is also the torchrun entry point:
``torchrun --nproc_per_node=4 -m flare_rt.train.command small --dataset DIR --output DIR``.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from flare_rt.errors import BackendUnavailableError

log = logging.getLogger(__name__)

DESCRIPTION = """\
Train the paper's big or small network (or the tiny test network) on a FLARE23 or nnU-Net raw dataset
folder: index the cases, compute the CT fingerprint, preprocess them once into a cache, train with
Dice + CE (marginal for partially labelled cases) and export a verified fp32 bundle (OUTPUT/model.onnx)
that 'flare-rt segment --model' runs. CONFIG is a JSON file or a packaged preset (big, small, tiny).
Progress goes to OUTPUT/progress.csv and progress.png; a crashed run continues with --resume.
Several GPUs or nodes: launch with torchrun (python -m torch.distributed.run) and
'-m flare_rt.train.command'.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", metavar="CONFIG", help="training config JSON, or a preset: big, small, tiny")
    parser.add_argument("--dataset", type=Path, help="dataset folder (sets data.dataset)")
    parser.add_argument("--index", type=Path, help="dataset index JSON (sets data.index; built when missing)")
    parser.add_argument("--output", type=Path, help="output folder (sets output)")
    parser.add_argument("--resume", action="store_true", help="continue the run in OUTPUT from its last checkpoint")
    parser.add_argument("--prepare-only", action="store_true",
                        help="only index, fingerprint and preprocess (before a multi-GPU launch)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set schedule.epochs=100 (JSON values; repeatable)")


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``train`` subcommand; its ``func(args)`` returns the exit code."""
    parser = subparsers.add_parser("train", help="train a network into a bundle (needs torch)",
                                   description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def config_from_args(args: argparse.Namespace):
    """The config file (or preset) with the command line's overrides applied."""
    from flare_rt.train.config import CONFIG_DIR, load_config, preset_path

    path = Path(args.config)
    if not path.is_file() and not args.config.endswith(".json"):
        path = preset_path(args.config)
    overrides = list(args.set)
    for key, value in (("data.dataset", args.dataset), ("data.index", args.index), ("output", args.output)):
        if value is not None:
            overrides.append(f"{key}={str(Path(value).resolve())}")
    config = load_config(path, overrides)
    log.debug("config %s (presets in %s)", path, CONFIG_DIR)
    return config


def run(args: argparse.Namespace) -> int:
    """Train (or only prepare); typed errors go to ``cli.run_command``."""
    if int(os.environ.get("RANK", "0")) > 0:  # torchrun: one process logs
        logging.getLogger("flare_rt").setLevel(logging.WARNING)
    try:
        import torch  # noqa: F401
    except ImportError as exc:
        raise BackendUnavailableError("flare-rt train needs PyTorch: pip install 'flare-rt[train]'") from exc
    from flare_rt.train import prepare, train

    config = config_from_args(args)
    if args.prepare_only:
        p = prepare(config)
        log.info("prepared %d training and %d validation cases in %s", len(p.train_ids), len(p.val_ids),
                 p.cache_dir)
        return 0
    result = train(config, resume=args.resume)
    if result.bundle is not None:
        log.info("bundle written: %s (segment with: flare-rt segment CT OUT --model %s)", result.bundle, result.bundle)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from flare_rt.cli import run_command, setup_logging

    setup_logging()
    parser = argparse.ArgumentParser(prog="flare-rt train", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run_command(run, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
