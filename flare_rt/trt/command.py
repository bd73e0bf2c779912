"""``flare-rt build-engine [BUNDLE]``: build (ahead of time) the TensorRT engine that ``segment
--backend tensorrt`` loads, for this GPU, into the cache folder; print its key and path.

Baking a challenge image runs this inside the image on the target card (``export/bake_engine.sh``).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ..errors import EngineError
from .build import DEFAULT_WORKSPACE_MB, PRECISIONS, EngineConfig

log = logging.getLogger(__name__)

DESCRIPTION = """\
Build the TensorRT engine of a bundle (default: the packaged model) for the GPU of this machine,
with the batch profile 1 / B / B for --batch-size B, into the cache folder ($FLARE_RT_CACHE/engines),
and print its key and path. An engine runs only on the GPU model and TensorRT version it was built
with: build it on the card it will run on. An existing engine with the same key is reused unless
--force.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", nargs="?", help="model bundle (.onnx); default $FLARE_RT_MODEL or the packaged model")
    parser.add_argument("--batch-size", type=int, default=1, metavar="B",
                        help="tiles per network call the engine is built for (segment's --batch-size)")
    parser.add_argument("--precision", choices=PRECISIONS, default=None,
                        help="engine precision (default: the bundle's)")
    parser.add_argument("--workspace", type=int, default=DEFAULT_WORKSPACE_MB, metavar="MB",
                        help="scratch memory TensorRT's kernels may use (default %(default)s MB)")
    parser.add_argument("--timing-cache", type=Path, default=None, metavar="PATH",
                        help="timing cache file (default: beside the engines, per GPU and TensorRT version)")
    parser.add_argument("--gpu", default=None, metavar="NAME",
                        help="refuse unless this machine's GPU is NAME (e.g. 'RTX 5000'): the card the engine is for")
    parser.add_argument("--force", action="store_true", help="rebuild even if a matching engine exists")


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("build-engine", help="build the TensorRT engine for this GPU ahead of time",
                                   description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging (TensorRT's messages)")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from ..bundle import Bundle
    from ..cli import default_model
    from .cache import EngineStore, load_engine
    from ..gpu import import_cupy
    from .runtime import current_gpu, load_tensorrt

    bundle = Bundle.load(args.bundle or default_model())
    precision = args.precision or bundle.meta.precision
    config = EngineConfig.for_batch(args.batch_size, precision if precision in PRECISIONS else "fp16",
                                    args.workspace, args.timing_cache)
    trt, cp = load_tensorrt(), import_cupy()
    gpu = current_gpu(cp)
    if args.gpu and args.gpu.lower() not in gpu.name.lower():
        raise EngineError(f"this machine's GPU is {gpu.describe()}, not {args.gpu!r}: a TensorRT engine is built on the "
                          "card it will run on; run build-engine there")
    store = EngineStore.default()
    loaded = load_engine(bundle, config, trt=trt, cp=cp, gpu=gpu, store=store,
                         policy="force" if args.force else "auto", exact=True)
    loaded.runner.close()
    timing = config.timing_cache or store.timing_cache_path(loaded.key)
    status = f"built in {loaded.build_seconds:.1f}s" if loaded.source == "built" else "cached (exists; --force rebuilds)"
    sys.stdout.write(f"engine  {loaded.path}\n"
                     f"status  {status}\n"
                     f"key     {loaded.key.describe()}\n"
                     f"config  {config.describe()}\n"
                     f"timing  {timing}\n")
    return 0
