"""``flare-rt``: one entry point with subcommands, a thin layer over the Python API."""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from . import __version__
from .atomic import check_new_outputs, check_writable
from .errors import ConfigError, FlareError, InputImageError
from .resources import default_model

log = logging.getLogger("flare_rt")



# -- segment ----------------------------------------------------------------------------------------
def _output_path(src: Path, dst: Path) -> Path:
    from .io import IMAGE_SUFFIXES, image_suffix

    if image_suffix(dst):
        return dst
    if src.is_dir():  # a DICOM series: .nii.gz by default
        return dst.with_name(dst.name + ".nii.gz") if not dst.is_dir() else dst / f"{src.resolve().name}.nii.gz"
    raise InputImageError(f"{dst}: unknown output format; end OUT with one of {', '.join(IMAGE_SUFFIXES)}")


def segment_options(args):
    from .pipeline import SegmentOptions, parse_fast_options

    return SegmentOptions(mode=args.mode, step=args.step, tta=args.tta, batch_size=args.batch_size,
                          probabilities=args.save_probabilities, force=args.force, series_uid=args.series,
                          fast=parse_fast_options(args.fast_option), network_labels=bool(args.save_network_labels))


def case_outputs(labels: Path, args, folder: bool = False):
    """The files one case writes: labels, and statistics/preview where asked for (beside the labels,
    or at the given path for a single case)."""
    from .pipeline import CaseOutputs

    out = CaseOutputs(labels)
    stats = preview = None
    if args.statistics is not None:
        stats = out.default_statistics() if folder or args.statistics is True else Path(args.statistics)
    if args.preview is not None:
        preview = out.default_preview() if folder or args.preview is True else Path(args.preview)
    return CaseOutputs(labels, stats, preview)


def load_segmenter(args, options, progress: bool):
    """The segmenter of ``args``' model and backend, and the seconds its loading took (logged here)."""
    from .backends import create_backend
    from .bundle import Bundle
    from .pipeline import Segmenter

    t0 = time.perf_counter()
    bundle = Bundle.load(args.model or default_model())
    if not args.model:
        log.info("no --model given: the packaged model %s", bundle.path.name)
    backend = create_backend(bundle, args.backend, args.device, args.threads, args.batch_size,
                             cuda_graphs=args.cuda_graphs)
    seg = Segmenter(bundle, backend, options, progress=progress)
    seconds = time.perf_counter() - t0
    log.info("model %s loaded in %.2fs (%s, %s mode)", bundle.path.name, seconds, backend.describe(), options.mode)
    return seg, seconds


def cmd_segment(args) -> int:
    from .folder import is_case_folder

    src, dst = Path(args.input), Path(args.output)
    if not src.exists():
        raise InputImageError(f"{src}: no such file or directory")
    options = segment_options(args)
    if is_case_folder(src):
        if args.save_network_labels:
            raise ConfigError("--save-network-labels applies to a single image, not folder mode")
        if isinstance(args.preview, str):
            raise ConfigError(f"--preview {args.preview}: a path applies to a single image; folder mode writes "
                              "<case>_preview.png beside each output (give --preview without a path)")
        if args.series is not None:
            raise ConfigError(f"--series picks a series of a DICOM folder; {src} is a folder of *_0000.nii.gz cases")
        return segment_folder(src, dst, options, args)
    if args.part is not None:
        raise ConfigError(f"--part {args.part} applies to folder mode; {src} is a single image")
    if args.series is not None and not src.is_dir():
        raise ConfigError(f"--series picks a series of a DICOM folder; {src} is an image file")
    return segment_single(src, dst, options, args)


def _read_and_load(src: Path, options, args, timer):
    """The volume and the segmenter. On the CPU the model loads (and compiles) on a thread while the CT
    is read and decompressed; bad input still fails with its own error, whatever the loader did (its
    result or error is dropped). GPU contexts are made on the main thread, after the read."""
    from concurrent.futures import ThreadPoolExecutor

    from .backends import resolve_device
    from .io import load_volume

    def read():
        with timer("read"):
            return load_volume(src, options.series_uid, options.force)

    if resolve_device(args.device) != "cpu":
        vol = read()  # bad input fails before the model is loaded
        return vol, load_segmenter(args, options, progress=not args.quiet)[0]
    with ThreadPoolExecutor(1, thread_name_prefix="flare-rt-load") as pool:
        loading = pool.submit(load_segmenter, args, options, not args.quiet)
        try:
            vol = read()
        except BaseException:
            loading.cancel()
            raise
        return vol, loading.result()[0]


def segment_single(src: Path, dst: Path, options, args) -> int:
    from .pipeline import StageTimer

    t0 = time.perf_counter()
    dst = _output_path(src, dst)
    outputs = case_outputs(dst, args)
    extras = [p for p in (args.report, args.save_network_labels) if p]
    check_new_outputs([*outputs.files(options.probabilities), *extras], args.overwrite, sources=[src])
    timer = StageTimer()
    vol, seg = _read_and_load(src, options, args, timer)
    pred = seg.segment_volume(vol, outputs, timer)
    if args.save_network_labels:
        import numpy as np

        from .atomic import atomic_path

        with atomic_path(args.save_network_labels) as tmp:
            np.savez_compressed(tmp, labels=pred.network_labels)
    if args.report:
        _write_report(args.report, src, dst, pred, seg.backend, options, time.perf_counter() - t0)
    return 0


def segment_folder(src: Path, dst: Path, options, args) -> int:
    from tqdm import tqdm

    from .folder import (
        CaseReport,
        CaseStages,
        list_cases,
        other_images,
        outcome_records,
        parse_part,
        run_folder,
        status_counts,
        summary_table,
    )
    from .io import load_volume
    from .pipeline import StageTimer

    t0 = time.perf_counter()
    check_writable(dst)
    # folder mode rewrites these each run, as its table
    check_new_outputs([p for p in (args.statistics, args.report) if isinstance(p, str)], overwrite=True)
    cases = list_cases(src, dst, parse_part(args.part))
    others = other_images(src)
    if others:
        log.warning("%s: %d image file(s) not named *_0000.nii.gz are not segmented: %s", src, len(others),
                    ", ".join(others[:5]) + (", ..." if len(others) > 5 else ""))
    seg, load_s = load_segmenter(args, options, progress=False)

    def read(case):
        timer = StageTimer()
        with timer("read"):
            return load_volume(case.image, options.series_uid, options.force), timer

    def compute(case, loaded):
        vol, timer = loaded
        return seg.predict(vol, timer)

    def write(case, loaded, pred) -> CaseReport:
        vol, timer = loaded
        seg.write_outputs(vol, pred, case_outputs(case.output, args, folder=True), timer)
        return CaseReport(pred.tiles, dict(timer.t))

    with tqdm(total=len(cases), desc="segment", unit="case", disable=True if args.quiet else None) as bar:  # TTY only
        outcomes = run_folder(cases, dst, CaseStages(read, compute, write), args.overwrite, progress=bar.update)
    if args.statistics is not None:
        from .statistics import write_folder_csv

        csv = dst / "statistics.csv" if args.statistics is True else Path(args.statistics)
        write_folder_csv(dst, csv)
    if args.report:
        _write_json(args.report, {"input": str(src), "output": str(dst), "mode": options.mode,
                                  "backend": seg.backend.describe(), "model_load_s": round(load_s, 3),
                                  "total_s": round(time.perf_counter() - t0, 3), "counts": status_counts(outcomes),
                                  "cases": outcome_records(outcomes)})
    if not args.quiet:
        sys.stdout.write(summary_table(outcomes) + "\n")
    failures = [o for o in outcomes if o.status == "failed"]
    log.info("%d cases in %.1fs", len(outcomes), time.perf_counter() - t0)
    if failures:
        sys.stderr.write(f"flare-rt: {len(failures)} of {len(outcomes)} cases failed:\n")
        for o in failures:
            sys.stderr.write(f"  {o.case.image.name}: {o.reason}\n")
        return 1
    return 0


def _write_report(path, src, dst, pred, backend, options, total: float) -> None:
    # model_load: what loading the model added to the run (on the CPU it overlaps the read)
    _write_json(path, {"input": str(src), "output": str(dst), "mode": options.mode, "backend": backend.describe(),
                       "timings_s": {**pred.timings, "model_load": total - sum(pred.timings.values())},
                       "total_s": total, "tiles": pred.tiles, "network_shape": list(pred.network_shape)})


def _write_json(path, obj) -> None:
    import json

    from .atomic import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1))


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

    check_new_outputs([args.bundle], args.overwrite, sources=[args.model_dir])
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

    check_new_outputs([args.output], args.overwrite, sources=[args.bundle])
    b = Bundle.load(args.bundle)
    net = network_from_bundle(b)
    path, results = export_bundle(net, b.meta, args.output, args.precision, default_check_inputs(b.meta))
    log.info("wrote %s (%.1f MB)", path, path.stat().st_size / 1e6)
    return 0


# -- parser -----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from .backends import REGISTRY

    backend_names = ", ".join(REGISTRY)
    p = argparse.ArgumentParser(prog="flare-rt", description="Fast FLARE abdominal CT segmentation runtime.")
    p.add_argument("--version", action="version", version=f"flare-rt {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("-v", "--verbose", action="store_true", help="debug logging")
        sp.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")

    s = sub.add_parser("segment", help="segment a CT (file, DICOM folder, or folder of *_0000.nii.gz)")
    s.add_argument("input", help="image file (.nii.gz/.nii/.mha/.nrrd), DICOM folder (a series or a study), "
                   "or case folder")
    s.add_argument("output", help="label file (format from extension) or output folder in folder mode")
    s.add_argument("--model", help="model bundle (.onnx); default $FLARE_RT_MODEL or the packaged model")
    s.add_argument("--mode", choices=["fast", "faithful"], default="fast",
                   help="faithful: nnU-Net's predictor step by step; fast (default): air tiles skipped, labels "
                        "upsampled with the logits interpolated only where they change")
    s.add_argument("--backend", default="auto", help=f"auto (by device and bundle precision), {backend_names}")
    s.add_argument("--device", default="auto", help="auto, cpu or cuda")
    s.add_argument("--threads", type=int, default=None, help="CPU threads for the network")
    s.add_argument("--step", type=float, default=None, help="tile step as a fraction of the patch (0.5 = nnU-Net)")
    s.add_argument("--tta", dest="tta", action="store_true", default=None, help="mirroring test-time augmentation")
    s.add_argument("--no-tta", dest="tta", action="store_false")
    s.add_argument("--batch-size", type=int, default=1, help="tiles per network call")
    s.add_argument("--cuda-graphs", action="store_true",
                   help="torch on CUDA: replay the network as a CUDA graph (slightly faster calls, more GPU memory)")
    s.add_argument("--save-probabilities", action="store_true",
                   help="also write class probabilities (<name>.npz beside the labels)")
    s.add_argument("--statistics", nargs="?", const=True, metavar="PATH",
                   help="per-structure volume (mL) and mean/median HU as JSON (default <name>_statistics.json "
                        "beside the output); folder mode also writes statistics.csv (or PATH), a row per case")
    s.add_argument("--preview", nargs="?", const=True, metavar="PATH.png",
                   help="PNG of axial, coronal and sagittal slices with the labels (default <name>_preview.png)")
    s.add_argument("--part", metavar="I/N", help="folder mode: take the I-th (1-based) of N static shards of the cases")
    s.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    s.add_argument("--force", action="store_true", help="segment images whose intensities do not look like CT")
    s.add_argument("--series", help="DICOM SeriesInstanceUID to segment when a DICOM folder (or its subfolders) "
                   "holds several; default: the largest series")
    s.add_argument("--fast-option", action="append", metavar="KEY=VALUE",
                   help="tune fast mode: roi=0/1, roi_crop=0/1, body_threshold_hu, body_margin, "
                        "label_upsampling=0/1, compute_dtype=float32/float64 (repeatable)")
    s.add_argument("--report", help="write stage timings and tile counts as JSON; folder mode: each case's status, "
                                    "time, tiles, stage timings and failure, the model load and total time")
    s.add_argument("--save-network-labels", metavar="PATH.npz",
                   help="single file: also save the argmax at network resolution (what precision checks compare)")
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
    m.add_argument("--orientation", default=None,
                   help="orientation the model expects: none (default: axial slice order, flips as stored, as "
                   "nnU-Net on axial CTs), stored (the array order whatever it is), or a code such as LPS")
    m.add_argument("--trust-checkpoint", action="store_true", help="allow full unpickling of the checkpoint")
    m.add_argument("--demo", action="store_true", help="mark the bundle as a coarse demonstration model")
    m.add_argument("--overwrite", action="store_true", help="replace an existing BUNDLE")
    common(m)
    m.set_defaults(func=cmd_import_nnunet)

    e = sub.add_parser("export", help="re-export a bundle (e.g. to fp16), verified against PyTorch (needs torch)")
    e.add_argument("bundle")
    e.add_argument("output")
    e.add_argument("--precision", choices=["fp32", "fp16"], default="fp16")
    e.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT")
    common(e)
    e.set_defaults(func=cmd_export)

    from .evaluate.command import register as register_evaluate  # imports its dependencies on use
    from .train.command import register as register_train  # imports torch on use
    from .trt.command import register as register_build_engine  # imports tensorrt on use

    register_evaluate(sub)
    register_train(sub)
    register_build_engine(sub)
    from .quantize import register as register_quantize
    from .stages.command import register as register_pipeline

    register_quantize(sub)
    register_pipeline(sub)
    return p


def setup_logging(verbose: bool = False, quiet: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True)


def run_command(func, args) -> int:
    """Run a subcommand: every error flare-rt raises on purpose becomes one line and its exit code."""
    try:
        return int(func(args) or 0)
    except FlareError as exc:
        sys.stderr.write(f"flare-rt: error: {exc}\n")
        return exc.exit_code
    except MemoryError:
        sys.stderr.write("flare-rt: error: out of memory; try --mode fast, a smaller --batch-size, or a machine with "
                         "more RAM\n")
        return 7
    except KeyboardInterrupt:
        sys.stderr.write("flare-rt: interrupted\n")
        return 130


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(getattr(args, "verbose", False), getattr(args, "quiet", False))
    from tqdm.contrib.logging import logging_redirect_tqdm

    with logging_redirect_tqdm():  # log lines print above a progress bar instead of through it
        return run_command(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
