"""Precision variants of a bundle (bf16, int8): the agreement they record against their fp32 parent,
and the rule by which ``--backend auto`` picks a backend and a compute precision on a CPU.

A variant is a bundle of its own (``flare-rt quantize``). Its metadata holds a
:class:`PrecisionRecord`: how it was made, the calibration set (files and hashes), and the agreement
measured against the fp32 bundle on named check cases (per-class Dice of the labels for classes of
at least ``min_voxels`` voxels, and voxel argmax agreement at network resolution). A lower precision
is *proven* when every check case meets :data:`BOUND` and there are at least ``BOUND.min_cases``
check cases, none of them in the calibration set; only then does ``auto`` use it.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from .errors import FlareError, ModelError

FLOAT_PRECISIONS = ("fp32", "fp16")  # weights and arithmetic in floating point: every backend runs them
VARIANT_PRECISIONS = ("bf16", "int8")  # made by `flare-rt quantize`, with a PrecisionRecord
QUANTISED = ("int8",)  # weights stored quantised (QDQ graph): only ONNX Runtime and OpenVINO run them
#: bundle precision -> the arithmetic it asks of a CPU backend (fp16 weights are widened exactly to fp32)
COMPUTE = {"fp32": "fp32", "fp16": "fp32", "bf16": "bf16", "int8": "int8"}


@dataclass(frozen=True)
class AgreementBound:
    """When a lower precision may be used by ``auto`` (issue 12): on every check case."""

    min_dice: float = 0.99  # per-class Dice of the labels vs the fp32 bundle's, classes >= min_voxels
    min_network_agreement: float = 0.999  # voxel argmax agreement at network resolution
    min_cases: int = 2  # the two benchmark CTs (ircad01 and the 512x512x269 case)


BOUND = AgreementBound()


@dataclass(frozen=True)
class FileHash:
    name: str  # file or DICOM folder name (no machine path)
    sha256: str  # of the file, or of the sorted series files' bytes


@dataclass(frozen=True)
class CaseAgreement:
    case: FileHash
    dice: dict[str, float]  # per foreground class with >= min_voxels voxels in either label map
    min_voxels: int
    network_agreement: float  # argmax agreement at network resolution
    voxel_agreement: float  # label agreement on the input grid
    network_voxels: int

    @property
    def min_dice(self) -> float:
        return min(self.dice.values(), default=1.0)

    def meets(self, bound: AgreementBound = BOUND) -> bool:
        return self.min_dice >= bound.min_dice and self.network_agreement >= bound.min_network_agreement


@dataclass(frozen=True)
class PrecisionRecord:
    """How a variant bundle was made and what it was measured to keep (stored in its metadata)."""

    precision: str  # "bf16" or "int8"
    method: str  # e.g. "OpenVINO CPU, INFERENCE_PRECISION_HINT bf16"
    backend: str  # backend the agreement was measured on (and the one auto uses for it)
    reference: FileHash  # the fp32 bundle it was compared against
    calibration: tuple[FileHash, ...] = ()  # int8: the CTs its activation ranges come from
    checks: tuple[CaseAgreement, ...] = ()
    options: dict = field(default_factory=dict)  # method settings (ignored layers, subset size, ...)
    cpu: str = ""  # the CPU the agreement was measured on
    mode: str = "fast"  # pipeline mode of the checks

    @classmethod
    def from_dict(cls, d: dict) -> "PrecisionRecord":
        checks = tuple(CaseAgreement(**{**c, "case": FileHash(**c["case"])}) for c in d.get("checks", ()))
        return cls(**{**d, "reference": FileHash(**d["reference"]),
                      "calibration": tuple(FileHash(**c) for c in d.get("calibration", ())), "checks": checks})

    def proven(self, bound: AgreementBound = BOUND) -> tuple[bool, str]:
        """Whether the record proves the precision against ``bound``, and why (one line)."""
        calibrated = {c.sha256 for c in self.calibration}
        leaked = [c.case.name for c in self.checks if c.case.sha256 in calibrated]
        if leaked:
            return False, f"check cases {leaked} are in the calibration set"
        if len(self.checks) < bound.min_cases:
            return False, f"{len(self.checks)} check case(s) recorded, {bound.min_cases} needed"
        failed = [f"{c.case.name} (min Dice {c.min_dice:.4f}, network agreement {c.network_agreement:.5f})"
                  for c in self.checks if not c.meets(bound)]
        if failed:
            return False, (f"below the bound (Dice >= {bound.min_dice}, network agreement >= "
                           f"{bound.min_network_agreement}) on " + ", ".join(failed))
        return True, f"meets the bound on {len(self.checks)} check cases"

    def describe(self) -> list[str]:
        lines = [f"variant     {self.precision} by {self.method}, measured on {self.backend}"
                 + (f" ({self.cpu})" if self.cpu else ""),
                 f"reference   {self.reference.name} sha256 {self.reference.sha256[:16]}"]
        if self.calibration:
            lines.append("calibration " + ", ".join(f"{c.name} ({c.sha256[:12]})" for c in self.calibration))
        for c in self.checks:
            lines.append(f"agreement   {c.case.name} ({c.case.sha256[:12]}): network argmax {c.network_agreement:.5f}, "
                         f"voxels {c.voxel_agreement:.5f}, min Dice {c.min_dice:.4f} over {len(c.dice)} classes "
                         f">= {c.min_voxels} voxels")
        ok, why = self.proven()
        lines.append(f"auto        {'uses' if ok else 'does not use'} this precision: {why}")
        return lines


def sha256_path(path: str | Path) -> FileHash:
    """Hash of a file, or of a folder's files (sorted by name: a DICOM series)."""
    path = Path(path)
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return FileHash(path.name, h.hexdigest())


def require_float_weights(meta, path, what: str, error: type[FlareError] = ModelError) -> None:
    """Raise a one-line ``error`` when ``what`` (a backend or command that needs the float weights:
    the torch backend, export, a TensorRT build) is given a quantised bundle."""
    if meta.precision in QUANTISED:
        ref = meta.precision_record.reference.name if meta.precision_record else "the fp32 bundle it was made from"
        raise error(f"{path}: an {meta.precision} (quantised) bundle; {what} cannot run it: use --backend "
                         f"openvino or onnxruntime, or pass the fp32 bundle ({ref})")


# -- auto selection on a CPU ----------------------------------------------------------------------------
#: The fixed order in which ``auto`` tries backends on a CPU, fastest first (bench/cpu_backends.py):
#: OpenVINO, then ONNX Runtime, then PyTorch.
CPU_ORDER = ("openvino", "onnxruntime", "torch")
#: Which backends run which stored precision (compute precision follows the bundle's).
RUNS = {"fp32": CPU_ORDER, "fp16": CPU_ORDER, "bf16": CPU_ORDER, "int8": ("openvino", "onnxruntime")}


@dataclass(frozen=True)
class Choice:
    backend: str
    compute: str  # the precision the network is computed in: "fp32", "bf16" or "int8"
    reason: str


def choose_cpu(precision: str, record: PrecisionRecord | None, installed: frozenset[str] | set[str],
               cpu_bf16: bool, bound: AgreementBound = BOUND) -> list[Choice]:
    """The backends ``auto`` tries on a CPU for a bundle, in order (a pure function).

    - fp32/fp16 bundles: fp32 compute on the first installed of :data:`CPU_ORDER`.
    - bf16/int8 bundles whose record is proven (:meth:`PrecisionRecord.proven`): the backend the
      agreement was measured on, in that precision (bf16 only where the CPU has bf16 instructions),
      then fp32 compute on the others.
    - unproven bf16 bundles (the graph is the fp32 one): fp32 compute, as an fp32 bundle.
    - unproven int8 bundles: nothing (the weights are quantised; make or pass the fp32 bundle)."""
    if precision not in RUNS:
        raise ModelError(f"unknown bundle precision {precision!r}; expected one of {sorted(RUNS)}")
    fp32 = [Choice(b, "fp32", "fp32 is always proven") for b in CPU_ORDER if b in installed]
    if precision in FLOAT_PRECISIONS:
        return fp32
    ok, why = record.proven(bound) if record is not None else (False, "no agreement record")
    if precision == "bf16":
        if ok and cpu_bf16 and record.backend in installed:
            return [Choice(record.backend, "bf16", why)] + [c for c in fp32 if c.backend != record.backend]
        return [Choice(c.backend, "fp32", f"bf16 not used: {why if not ok else 'no bf16 on this CPU'}")
                for c in fp32]
    if ok and record.backend in installed:
        return [Choice(record.backend, "int8", why)]
    return []
