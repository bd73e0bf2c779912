"""``flare-rt quantize BUNDLE OUT --precision int8|bf16``: a lower-precision variant of an fp32 bundle,
as a bundle of its own that records how it was made and what it keeps.

- **bf16**: the same graph; the metadata asks for bf16 arithmetic (OpenVINO on a CPU with
  AVX512_BF16/AMX).
- **int8**: post-training quantisation to a QDQ ONNX graph, calibrated on the tiles the network
  sees for the CTs in ``--calibration`` (the pipeline's own preprocessing and tile placement).
  Convolutions are quantised (weights int8 per channel, input activations uint8 per tensor);
  InstanceNorm and the last convolution stay fp32, and so do the convolutions' outputs: each feeds an
  InstanceNorm, which divides a channel by its own spread, so one uint8 scale for a whole output
  tensor would leave a narrow channel a few levels that the normalisation then magnifies (quantising
  them cost 11 points of tile argmax agreement on the demonstration model: 0.88 against 0.98 on
  ircad01 tiles; bench/README.md). The default quantiser is ONNX Runtime's static
  QDQ (``--method ort``): OpenVINO runs its graph as ONNX Runtime does. NNCF's ONNX graph
  (``--method nncf``) ran in ONNX Runtime within 1-2 % of fp32 per tile but OpenVINO 2026.4 ran it
  at 0.77 argmax agreement, and ONNX Runtime's int8 3D convolutions are slower than its fp32 ones
  (bench/README.md).

Both then segment each ``--check`` CT with the variant and with the fp32 bundle (ONNX Runtime, fp32)
and record per-class Dice (classes >= 1000 voxels) and the argmax agreement at network resolution;
``flare-rt info`` shows the record and ``--backend auto`` uses the variant only when it meets
:data:`flare_rt.precision.BOUND` (see :mod:`flare_rt.precision`).
"""
from __future__ import annotations

import argparse
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .agreement import MIN_VOXELS, label_agreement
from .atomic import check_new_outputs, check_writable
from .backends.base import Backend, BackendOptions
from .bundle import VARIANT_FORMAT_VERSION, Bundle, write_bundle
from .devices import cpu_name
from .errors import BackendUnavailableError, ConfigError, InputImageError, ModelError
from .precision import FLOAT_PRECISIONS, VARIANT_PRECISIONS, CaseAgreement, FileHash, PrecisionRecord, sha256_path

log = logging.getLogger(__name__)

METHODS = ("nncf", "ort")  # int8: NNCF post-training quantisation, or ONNX Runtime quantize_static (QDQ)
REFERENCE_BACKEND = "onnxruntime"  # the fp32 output the variant is compared with
BACKENDS = ("openvino", "onnxruntime")  # where a variant can run on a CPU


@dataclass(frozen=True)
class QuantizeOptions:
    precision: str  # "int8" or "bf16"
    backend: str = "openvino"  # where the variant runs (and its agreement is measured)
    method: str = "ort"  # int8 only (see METHODS)
    max_patches: int = 64  # calibration patches used (evenly chosen among all tiles of the calibration CTs)
    keep_last_fp32: bool = True  # int8: the output convolution (the logits) stays in fp32
    threads: int | None = None
    mode: str = "fast"  # pipeline mode for calibration tiles and the checks

    def __post_init__(self) -> None:
        if self.precision not in VARIANT_PRECISIONS:
            raise ConfigError(f"--precision must be one of {VARIANT_PRECISIONS}, got {self.precision!r}")
        if self.method not in METHODS:
            raise ConfigError(f"--method must be one of {METHODS}, got {self.method!r}")
        if self.max_patches < 1:
            raise ConfigError(f"--max-patches must be >= 1, got {self.max_patches}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"--backend must be one of {BACKENDS} (where the variant runs), got {self.backend!r}")
        if self.precision == "bf16" and self.backend != "openvino":
            raise ConfigError(f"bf16 arithmetic on a CPU is OpenVINO's; --backend {self.backend} cannot compute it")


# -- calibration data --------------------------------------------------------------------------------
def find_cts(folder: str | Path) -> list[Path]:
    """The CTs in ``folder``: image files at its top level and DICOM series (the folder itself, or each
    sub-folder holding a series at any depth: a study as exported, read as ``segment`` reads it). Raises
    :class:`InputImageError` naming the folder when there are none."""
    from .dicom import dicom_series_ids, find_series
    from .io import image_suffix

    folder = Path(folder)
    if not folder.is_dir():
        raise InputImageError(f"--calibration {folder}: not a folder; pass a folder of CTs (images or DICOM series)")
    found = [folder] if dicom_series_ids(folder) else []
    for p in sorted(folder.iterdir()):
        if p.is_file() and image_suffix(p):
            found.append(p)
        elif p.is_dir() and not p.name.startswith(".") and find_series(p):
            found.append(p)
    if not found:
        raise InputImageError(f"--calibration {folder}: no CT images (.nii.gz, .nii, .mha, .nrrd) or DICOM series "
                              "in this folder; pass a folder of CTs of patients that are not check cases")
    return found


class _TileRecorder(Backend):
    """A stand-in network that keeps the tiles the pipeline feeds it (and answers zeros)."""

    name = "recorder"

    def __init__(self, bundle):
        super().__init__(bundle, BackendOptions())
        self.tiles: list[np.ndarray] = []

    def __call__(self, batch):
        self.tiles.extend(np.array(t, dtype=np.float32) for t in batch)
        return np.zeros((len(batch), self.bundle.meta.num_classes, *batch.shape[2:]), dtype=np.float32)


def calibration_tiles(bundle: Bundle, cts: list[Path], max_patches: int, mode: str = "fast") -> np.ndarray:
    """(N, C, *patch) float32 tiles exactly as the network sees them for ``cts`` (every CT must pass the
    runtime's CT check), at most ``max_patches``, evenly chosen."""
    from .io import load_volume
    from .pipeline import SegmentOptions, Segmenter

    rec = _TileRecorder(bundle)
    seg = Segmenter(bundle, rec, SegmentOptions(mode=mode))
    for ct in cts:
        try:
            vol = load_volume(ct, force=None)
        except InputImageError as exc:
            raise InputImageError(f"--calibration {ct.parent if ct.is_file() else ct}: {exc}") from exc
        n0 = len(rec.tiles)
        seg.predict(vol)
        log.info("calibration: %s gives %d tiles", ct.name, len(rec.tiles) - n0)
    tiles = np.stack(rec.tiles)
    if len(tiles) > max_patches:
        tiles = tiles[np.linspace(0, len(tiles) - 1, max_patches).round().astype(int)]
    return tiles


# -- int8 ----------------------------------------------------------------------------------------------
def _fixed_batch(model, batch: int = 1):
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    for vi in list(m.graph.input) + list(m.graph.output):
        vi.type.tensor_type.shape.dim[0].Clear()
        vi.type.tensor_type.shape.dim[0].dim_value = batch
    del m.graph.value_info[:]
    return m


def _dynamic_batch(model):
    for vi in list(model.graph.input) + list(model.graph.output):
        vi.type.tensor_type.shape.dim[0].Clear()
        vi.type.tensor_type.shape.dim[0].dim_param = "batch"
    return model


def quantize_int8(model, tiles: np.ndarray, input_name: str, options: QuantizeOptions):
    """QDQ int8 ONNX graph of fp32 ``model`` calibrated on ``tiles``; InstanceNorm stays fp32, and the last
    convolution too with ``keep_last_fp32``. Returns (model, method description, settings)."""
    model = _fixed_batch(model)
    last_conv = [n.name for n in model.graph.node if n.op_type == "Conv"][-1:]
    keep = last_conv if options.keep_last_fp32 else []
    settings = {"method": options.method, "patches": int(len(tiles)), "fp32_nodes": keep,
                "weights": "int8 per channel", "activations": "uint8 per tensor, convolution inputs only"}
    if options.method == "nncf":
        try:
            import nncf
        except ImportError as exc:
            raise BackendUnavailableError("int8 quantisation with NNCF needs it: pip install 'flare-rt[openvino]'") \
                from exc
        from .sigstack import kept_signal_stack

        with kept_signal_stack():  # NNCF may load OpenVINO's CPU plugin, which swaps the thread's signal stack
            q = nncf.quantize(model, nncf.Dataset([{input_name: t[None]} for t in tiles]), subset_size=len(tiles),
                              preset=nncf.QuantizationPreset.MIXED, ignored_scope=nncf.IgnoredScope(names=keep))
        desc = f"NNCF {nncf.__version__} post-training quantisation (QDQ), mixed preset"
    else:
        import onnx

        from .backends.onnxrt import import_onnxruntime

        ort_version = import_onnxruntime().__version__
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

        class Reader(CalibrationDataReader):
            def __init__(self):
                self._it = iter([{input_name: t[None]} for t in tiles])

            def get_next(self):
                return next(self._it, None)

        with tempfile.TemporaryDirectory() as tmp:
            src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
            onnx.save(model, str(src))
            quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            op_types_to_quantize=["Conv", "ConvTranspose"], nodes_to_exclude=keep,
                            extra_options={"OpTypesToExcludeOutputQuantization": ["Conv", "ConvTranspose"]})
            q = onnx.load(str(dst))
        desc = f"ONNX Runtime {ort_version} static quantisation (QDQ, MinMax)"
    return _dynamic_batch(q), desc, settings


# -- agreement -----------------------------------------------------------------------------------------
def _segment(bundle: Bundle, backend: str, threads, mode: str, ct: Path):
    """``ct`` segmented with ``bundle`` on ``backend`` (CPU, in the bundle's precision), network labels kept."""
    from .backends import create_backend
    from .io import load_volume
    from .pipeline import SegmentOptions, Segmenter

    try:
        vol = load_volume(ct, force=None)
    except InputImageError as exc:
        raise InputImageError(f"--check {exc}") from exc
    net = create_backend(bundle, backend, "cpu", threads)
    try:
        return Segmenter(bundle, net, SegmentOptions(mode=mode, network_labels=True)).predict(vol)
    finally:
        net.close()


def measure_agreement(reference: Bundle, variant: Bundle, cts: list[Path], options: QuantizeOptions) -> list[CaseAgreement]:
    """Segment each CT with the fp32 ``reference`` (ONNX Runtime) and with ``variant`` (on
    ``options.backend``, in its precision); compare labels and network-resolution argmax."""
    names = {k: v for k, v in reference.meta.labels.items()}
    out = []
    for ct in cts:
        ref = _segment(reference, REFERENCE_BACKEND, options.threads, options.mode, ct)
        var = _segment(variant, options.backend, options.threads, options.mode, ct)
        labels = label_agreement(ref.labels, var.labels, names, MIN_VOXELS)
        net = float((ref.network_labels == var.network_labels).mean())
        case = CaseAgreement(sha256_path(ct), labels["dice"], MIN_VOXELS, net, labels["voxel_agreement"],
                             int(ref.network_labels.size))
        log.info("agreement on %s: network argmax %.5f, voxels %.5f, min Dice %.4f (%s)", ct.name, net,
                 case.voxel_agreement, case.min_dice, labels["min_dice_class"])
        out.append(case)
    return out


def quantize(bundle_path: str | Path, out: str | Path, options: QuantizeOptions,
             calibration: str | Path | None = None, checks: list[str | Path] = ()) -> Path:
    """Make the ``options.precision`` variant of the fp32 bundle at ``bundle_path``; write it to ``out``."""
    from .onnx_graph import to_fp32

    reference = Bundle.load(bundle_path)
    meta = reference.meta
    if meta.precision not in FLOAT_PRECISIONS:
        raise ModelError(f"{bundle_path}: already a {meta.precision} variant; quantize the fp32 bundle it was made "
                         "from")
    checks = [Path(c) for c in checks]
    for c in checks:
        if not c.exists():
            raise InputImageError(f"--check {c}: no such file or folder")
    check_writable(Path(out).parent)
    model = to_fp32(reference.load_onnx())
    calib: tuple[FileHash, ...] = ()
    settings: dict = {}
    if options.precision == "int8":
        if calibration is None:
            raise ConfigError("int8 needs --calibration DIR: a folder of CTs (not the check cases) to calibrate on")
        cts = find_cts(calibration)
        calib = tuple(sha256_path(c) for c in cts)
        leaked = {h.sha256 for h in calib} & {sha256_path(c).sha256 for c in checks}
        if leaked:
            raise ConfigError(f"--calibration {calibration} holds a --check case; calibrate on other patients")
        tiles = calibration_tiles(reference, cts, options.max_patches, options.mode)
        log.info("calibrating on %d tiles of %d CT(s) from %s", len(tiles), len(cts), calibration)
        model, method, settings = quantize_int8(model, tiles, meta.input_name, options)
    else:
        from .backends.openvino import cpu_has_bf16

        if not cpu_has_bf16():  # (raises with the install line without OpenVINO)
            raise BackendUnavailableError("this CPU has no bf16 instructions (AVX512_BF16/AMX): the bf16 variant's "
                                          "agreement cannot be measured here")
        method = "OpenVINO CPU, INFERENCE_PRECISION_HINT bf16"
    record = PrecisionRecord(precision=options.precision, method=method, backend=options.backend,
                             reference=sha256_path(reference.path), calibration=calib, options=settings,
                             cpu=cpu_name(), mode=options.mode)
    variant_meta = meta.with_(precision=options.precision, precision_record=record,
                              format_version=VARIANT_FORMAT_VERSION, weight_aliases={},
                              description=(meta.description + f" [{options.precision} variant]").strip())
    with tempfile.TemporaryDirectory() as tmp:
        draft = write_bundle(model, variant_meta, Path(tmp) / "variant.onnx")
        agreements = measure_agreement(reference, Bundle(draft, variant_meta), checks, options)
    from dataclasses import replace

    final = variant_meta.with_(precision_record=replace(record, checks=tuple(agreements)))
    path = write_bundle(model, final, out)
    ok, why = final.precision_record.proven()
    log.info("wrote %s (%.1f MB): auto %s it (%s)", path, path.stat().st_size / 1e6, "uses" if ok else "does not use",
             why)
    return path


# -- CLI -----------------------------------------------------------------------------------------------
def cmd_quantize(args) -> int:
    options = QuantizeOptions(precision=args.precision, backend=args.backend, method=args.method,
                              max_patches=args.max_patches, keep_last_fp32=not args.quantize_last,
                              threads=args.threads, mode=args.mode)
    check_new_outputs([args.output], args.overwrite, sources=[args.bundle])
    quantize(args.bundle, args.output, options, args.calibration, args.check or [])
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    q = subparsers.add_parser(
        "quantize", help="make a bf16 or int8 variant of an fp32 bundle, with its measured agreement",
        description="Make a bf16 or int8 variant of an fp32 bundle as a bundle of its own. int8 is calibrated on "
                    "the CTs in --calibration (patients that are not check cases). Each --check CT is segmented "
                    "with the variant and the fp32 bundle; the agreement (per-class Dice, network-resolution argmax "
                    "agreement) is stored in the variant's metadata, and --backend auto uses the variant only when "
                    "it meets the bound on at least two check cases.")
    q.add_argument("bundle", help="the fp32 (or fp16) bundle")
    q.add_argument("output", help="the variant bundle to write (.onnx)")
    q.add_argument("--precision", choices=VARIANT_PRECISIONS, required=True)
    q.add_argument("--calibration", metavar="DIR", help="int8: folder of CTs (images or DICOM series) to calibrate on")
    q.add_argument("--check", action="append", metavar="CT",
                   help="CT to measure the agreement on (repeatable; the benchmark CTs for the shipped recipe)")
    q.add_argument("--backend", choices=BACKENDS, default="openvino", help="backend that runs the variant")
    q.add_argument("--method", choices=METHODS, default="ort", help="int8 quantiser (default ort)")
    q.add_argument("--max-patches", type=int, default=64, help="calibration tiles used at most (default 64)")
    q.add_argument("--quantize-last", action="store_true", help="int8: quantise the output convolution too")
    q.add_argument("--mode", choices=["fast", "faithful"], default="fast", help="pipeline mode of tiles and checks")
    q.add_argument("--threads", type=int, default=None, help="CPU threads")
    q.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT")
    q.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    q.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    q.set_defaults(func=cmd_quantize)
    return q
