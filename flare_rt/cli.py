"""``flare-rt``: one entry point with subcommands, a thin layer over the Python API."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from . import __version__
from .errors import FlareError, InputImageError

log = logging.getLogger("flare_rt")



def default_model() -> Path:
    from .resources import DEFAULT_MODEL_NAME, default_model as resolve, MODEL_ENV

    path = resolve()
    if not os.environ.get(MODEL_ENV) and path.name == DEFAULT_MODEL_NAME:
        log.warning("no --model given: using the packaged coarse DEMONSTRATION model %s (trained on one 30-slice "
                    "scan; not accurate)", path.name)
    return path


# -- segment ----------------------------------------------------------------------------------------
def _is_case_folder(path: Path) -> bool:
    return path.is_dir() and any(path.glob("*_0000.nii.gz"))


def _output_path(src: Path, dst: Path) -> Path:
    from .io import image_suffix

    if image_suffix(dst):
        return dst
    if src.is_dir():  # a DICOM series: .nii.gz by default
        return dst.with_name(dst.name + ".nii.gz") if not dst.is_dir() else dst / f"{src.resolve().name}.nii.gz"
    raise InputImageError(f"{dst}: unknown output format; end OUT with one of .nii.gz, .nii, .mha, .nrrd")


def cmd_segment(args) -> int:
    from tqdm import tqdm

    from .backends import create_backend
    from .bundle import Bundle
    from .pipeline import SegmentOptions, Segmenter, parse_fast_options

    src, dst = Path(args.input), Path(args.output)
    options = SegmentOptions(mode=args.mode, step=args.step, tta=args.tta, batch_size=args.batch_size,
                             save_probabilities=args.save_probabilities, force=args.force, series_uid=args.series,
                             fast=parse_fast_options(args.fast_option))
    folder = _is_case_folder(src)
    if not src.exists():
        raise InputImageError(f"{src}: no such file or directory")
    if not folder:
        dst = _output_path(src, dst)
        if dst.resolve() == src.resolve():
            raise InputImageError(f"{dst}: output would overwrite the input")
        if dst.exists() and not args.overwrite:
            raise InputImageError(f"{dst}: exists; pass --overwrite to replace it")
    t0 = time.perf_counter()
    bundle = Bundle.load(args.model or default_model())
    backend = create_backend(bundle, args.backend, args.device, args.threads)
    seg = Segmenter(bundle, backend, options, progress=not args.quiet and not folder)
    log.info("model %s loaded in %.2fs (%s, %s mode)", bundle.path.name, time.perf_counter() - t0,
             backend.describe(), options.mode)
    if not folder:
        probs = None
        if args.save_probabilities:
            from .io import image_suffix

            probs = dst.with_name(dst.name[: -len(image_suffix(dst))] + ".npz")
            if probs.exists() and not args.overwrite:
                raise InputImageError(f"{probs}: exists; pass --overwrite to replace it")
        pred = seg.segment_file(src, dst, probs)
        if args.report:
            _write_report(args.report, src, dst, pred, backend, options, time.perf_counter() - t0)
        return 0
    cases = sorted(src.glob("*_0000.nii.gz"))
    dst.mkdir(parents=True, exist_ok=True)
    if args.save_probabilities:
        (dst / "probabilities").mkdir(exist_ok=True)
    failures, skipped, done = [], 0, 0
    for case in tqdm(cases, desc="segment", unit="case", disable=args.quiet):
        name = case.name[: -len("_0000.nii.gz")]
        out = dst / f"{name}.nii.gz"
        if out.resolve() == case.resolve():
            failures.append((case, "output would overwrite the input"))
            continue
        if out.exists() and not args.overwrite:
            skipped += 1
            continue
        try:
            probs = dst / "probabilities" / f"{name}.npz" if args.save_probabilities else None
            seg.segment_file(case, out, probs)
            done += 1
        except FlareError as exc:
            log.error("%s", exc)
            failures.append((case, str(exc)))
        except Exception as exc:  # keep going: one broken case must not stop the batch
            log.exception("%s: unexpected error", case)
            failures.append((case, f"unexpected {type(exc).__name__}: {exc}"))
    log.info("%d segmented, %d skipped (exist; --overwrite to redo), %d failed, in %.1fs",
             done, skipped, len(failures), time.perf_counter() - t0)
    if failures:
        sys.stderr.write(f"flare-rt: {len(failures)} of {len(cases)} cases failed:\n")
        for case, why in failures:
            sys.stderr.write(f"  {case.name}: {why}\n")
        return 1
    return 0


def _write_report(path, src, dst, pred, backend, options, total: float) -> None:
    import json

    report = {"input": str(src), "output": str(dst), "mode": options.mode, "backend": backend.describe(),
              "timings_s": {**pred.timings, "model_load": total - sum(pred.timings.values())},
              "total_s": total, "tiles": pred.tiles, "network_shape": list(pred.network_shape)}
    Path(path).write_text(json.dumps(report, indent=1))


# -- info / import / export --------------------------------------------------------------------------
def cmd_info(args) -> int:
    from .bundle import Bundle, describe

    b = Bundle.load(args.bundle)
    sys.stdout.write(describe(b.meta, b.path) + "\n")
    return 0


def cmd_import_nnunet(args) -> int:
    from .export import default_check_inputs, export_bundle
    from .nets import build_network
    from .nets.unet import load_weights
    from .nnunet import read_nnunet_model

    model = read_nnunet_model(args.model_dir, args.configuration, args.fold, args.checkpoint, args.trust_checkpoint)
    meta = model.meta
    if args.orientation:
        from .orientation import validate_code

        meta = meta.with_(orientation=validate_code(args.orientation))
    if args.demo:
        meta = meta.with_(demo=True, description="coarse demonstration model (not accurate)")
    net = build_network(meta.architecture)
    load_weights(net, model.state_dict)
    path, results = export_bundle(net, meta, args.bundle, args.precision, default_check_inputs(meta))
    log.info("wrote %s (%.1f MB)", path, path.stat().st_size / 1e6)
    return 0


def cmd_export(args) -> int:
    from .bundle import Bundle
    from .export import default_check_inputs, export_bundle
    from .nets import network_from_bundle

    b = Bundle.load(args.bundle)
    net = network_from_bundle(b)
    path, results = export_bundle(net, b.meta, args.output, args.precision, default_check_inputs(b.meta))
    log.info("wrote %s (%.1f MB)", path, path.stat().st_size / 1e6)
    return 0


# -- parser -----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flare-rt", description="Fast FLARE abdominal CT segmentation runtime.")
    p.add_argument("--version", action="version", version=f"flare-rt {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("-v", "--verbose", action="store_true", help="debug logging")
        sp.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")

    s = sub.add_parser("segment", help="segment a CT (file, DICOM folder, or folder of *_0000.nii.gz)")
    s.add_argument("input", help="image file (.nii.gz/.nii/.mha/.nrrd), DICOM series folder, or case folder")
    s.add_argument("output", help="label file (format from extension) or output folder in folder mode")
    s.add_argument("--model", help="model bundle (.onnx); default $FLARE_RT_MODEL or the packaged model")
    s.add_argument("--mode", choices=["fast", "faithful"], default="fast",
                   help="faithful: nnU-Net's predictor step by step; fast (default): ROI crop, air tiles "
                        "skipped, argmax at network resolution")
    s.add_argument("--backend", default="auto", help="auto, onnxruntime or torch")
    s.add_argument("--device", default="auto", help="auto, cpu or cuda")
    s.add_argument("--threads", type=int, default=None, help="CPU threads for the network")
    s.add_argument("--step", type=float, default=None, help="tile step as a fraction of the patch (0.5 = nnU-Net)")
    s.add_argument("--tta", dest="tta", action="store_true", default=None, help="mirroring test-time augmentation")
    s.add_argument("--no-tta", dest="tta", action="store_false")
    s.add_argument("--batch-size", type=int, default=1, help="tiles per network call")
    s.add_argument("--save-probabilities", action="store_true", help="also write class probabilities (.npz)")
    s.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    s.add_argument("--force", action="store_true", help="segment images whose intensities do not look like CT")
    s.add_argument("--series", help="DICOM SeriesInstanceUID to use when a folder holds several")
    s.add_argument("--fast-option", action="append", metavar="KEY=VALUE",
                   help="tune fast mode: roi=0/1, body_threshold_hu, body_margin, step, label_upsampling=0/1, "
                        "compute_dtype=float32/float64 (repeatable)")
    s.add_argument("--report", help="write stage timings and tile counts of a single-file run as JSON")
    common(s)
    s.set_defaults(func=cmd_segment)

    i = sub.add_parser("info", help="print a model bundle's metadata")
    i.add_argument("bundle")
    common(i)
    i.set_defaults(func=cmd_info)

    m = sub.add_parser("import-nnunet", help="convert an nnU-Net v2 model folder into a bundle (needs torch)")
    m.add_argument("model_dir")
    m.add_argument("bundle", help="output .onnx bundle")
    m.add_argument("--configuration", default="3d_fullres")
    m.add_argument("--fold", default=None, help="fold to import (default: the first with the checkpoint)")
    m.add_argument("--checkpoint", default="checkpoint_final.pth")
    m.add_argument("--precision", choices=["fp32", "fp16"], default="fp32")
    m.add_argument("--orientation", default=None, help="orientation the model expects (default none: array order)")
    m.add_argument("--trust-checkpoint", action="store_true", help="allow full unpickling of the checkpoint")
    m.add_argument("--demo", action="store_true", help="mark the bundle as a coarse demonstration model")
    common(m)
    m.set_defaults(func=cmd_import_nnunet)

    e = sub.add_parser("export", help="re-export a bundle (e.g. to fp16), verified against PyTorch (needs torch)")
    e.add_argument("bundle")
    e.add_argument("output")
    e.add_argument("--precision", choices=["fp32", "fp16"], default="fp16")
    common(e)
    e.set_defaults(func=cmd_export)

    try:
        from .evaluate.command import register
    except ImportError:  # evaluator not installed in this build
        register = None
    if register is not None:
        register(sub)
    from .train.command import register as register_train  # imports torch lazily, on use

    register_train(sub)
    from .stages.command import register as register_pipeline; register_pipeline(sub)  # noqa: E702
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if getattr(args, "verbose", False) else \
        logging.WARNING if getattr(args, "quiet", False) else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True)
    try:
        return int(args.func(args) or 0)
    except FlareError as exc:
        sys.stderr.write(f"flare-rt: error: {exc}\n")
        return exc.exit_code
    except MemoryError:
        sys.stderr.write("flare-rt: error: out of memory; try --mode fast or a machine with more RAM\n")
        return 7
    except KeyboardInterrupt:
        sys.stderr.write("flare-rt: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
