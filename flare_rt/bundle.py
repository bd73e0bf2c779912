"""The self-describing model bundle: one ONNX file whose ``metadata_props['flare_rt']`` holds
everything the runtime needs (labels, spacing, patch, CT statistics, tile step, mirroring axes,
orientation, resampling rules, architecture, precision, producer).

There is one copy of the weights: the ONNX initializers. The torch backend rebuilds the network
from ``architecture`` and reads its state dict from those initializers (``weight_aliases`` maps the
parameters an exporter de-duplicated to the initializer that holds their value).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from .atomic import atomic_path
from .errors import ModelError
from .orientation import NONE, is_code
from .precision import PrecisionRecord

METADATA_KEY = "flare_rt"
FORMAT_VERSION = 1
#: bf16/int8 variants (``flare-rt quantize``) carry a ``precision_record``; version 2 makes an older
#: flare-rt say "upgrade" instead of failing on the unknown field. Plain bundles stay version 1.
VARIANT_FORMAT_VERSION = 2
#: nnU-Net's tile step (a fraction of the patch): tiles overlap by half.
DEFAULT_TILE_STEP = 0.5


@dataclass(frozen=True)
class CTNormalization:
    """nnU-Net CTNormalization: clip to [lower, upper], subtract mean, divide by max(std, 1e-8)."""

    mean: float
    std: float
    lower: float  # percentile_00_5 of the training foreground
    upper: float  # percentile_99_5


@dataclass(frozen=True)
class ResamplingRule:
    """nnU-Net's resampling: spline ``order`` in-plane, ``order_z`` along a low-resolution axis when the
    spacing anisotropy exceeds ``anisotropy_threshold`` (``force_separate_z`` overrides)."""

    data_order: int = 3
    data_order_z: int = 0
    prob_order: int = 1
    prob_order_z: int = 0
    anisotropy_threshold: float = 3.0
    force_separate_z: bool | None = None


@dataclass(frozen=True)
class BundleMeta:
    name: str
    labels: dict[int, str]
    spacing: tuple[float, float, float]  # mm, in the network's axis order (after transpose_forward)
    patch_size: tuple[int, int, int]
    normalization: CTNormalization
    architecture: dict[str, Any]
    tile_step: float = DEFAULT_TILE_STEP
    mirror_axes: tuple[int, ...] = ()
    tta: bool = False  # default for --tta
    orientation: str = NONE  # flare_rt.orientation: "none", "stored" or e.g. "LPS"
    transpose_forward: tuple[int, int, int] = (0, 1, 2)
    crop_nonzero: bool = True
    resampling: ResamplingRule = field(default_factory=ResamplingRule)
    precision: str = "fp32"  # "fp32", "fp16" (InstanceNorm kept in fp32), "bf16" or "int8" (flare-rt quantize)
    input_name: str = "image"
    output_name: str = "logits"
    weight_aliases: dict[str, str] = field(default_factory=dict)
    demo: bool = False  # a coarse demonstration model, not for clinical or benchmark accuracy
    description: str = ""
    source: str = ""
    producer: str = ""
    format_version: int = FORMAT_VERSION
    precision_record: PrecisionRecord | None = None  # bf16/int8 variants: calibration and measured agreement

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def transpose_backward(self) -> tuple[int, int, int]:
        return tuple(int(i) for i in sorted(range(3), key=lambda k: self.transpose_forward[k]))  # type: ignore

    def to_json(self) -> str:
        d = asdict(self)
        d["labels"] = {str(k): v for k, v in self.labels.items()}
        if self.precision_record is None:
            del d["precision_record"]  # plain bundles keep the version-1 layout
        return json.dumps(d, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str = "bundle") -> "BundleMeta":
        try:
            d = json.loads(text)
            version = int(d.get("format_version", 0))
            if version > VARIANT_FORMAT_VERSION:
                raise ModelError(f"{where}: bundle format version {version} is newer than this flare-rt "
                                 f"supports ({VARIANT_FORMAT_VERSION}); upgrade flare-rt")
            d["labels"] = {int(k): v for k, v in d["labels"].items()}
            d["normalization"] = CTNormalization(**d["normalization"])
            d["resampling"] = ResamplingRule(**d.get("resampling", {}))
            for key in ("spacing", "patch_size", "mirror_axes", "transpose_forward"):
                d[key] = tuple(d[key])
            if d.get("precision_record") is not None:
                d["precision_record"] = PrecisionRecord.from_dict(d["precision_record"])
            _check_orientation(d.get("orientation", NONE), where)
            return cls(**d)
        except ModelError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ModelError(f"{where}: malformed flare-rt metadata ({type(exc).__name__}: {exc}); re-create the "
                             "bundle with 'flare-rt import-nnunet' or 'flare-rt export'") from exc

    def with_(self, **changes) -> "BundleMeta":
        return replace(self, **changes)


def _check_orientation(orientation, where: str) -> None:
    if not is_code(orientation):
        raise ModelError(f"{where}: orientation {orientation!r} in the flare-rt metadata is not 'none', 'stored' or "
                         "an upper-case code such as LPS; re-create the bundle with 'flare-rt import-nnunet' or "
                         "'flare-rt export'")


@dataclass(frozen=True)
class Bundle:
    """A bundle on disk: its path and parsed metadata (the graph is loaded by the backends)."""

    path: Path
    meta: BundleMeta

    @classmethod
    def load(cls, path: str | Path) -> "Bundle":
        path = Path(path)
        if not path.is_file():
            raise ModelError(f"{path}: model bundle not found; give the path of a .onnx bundle "
                             "(create one with 'flare-rt import-nnunet')")
        if path.stat().st_size == 0:
            raise ModelError(f"{path}: the model bundle is empty (0 bytes); copy or create it again")
        return cls(path, read_meta(path))

    def load_onnx(self):
        import onnx

        return onnx.load(str(self.path))


def read_meta(path: str | Path) -> BundleMeta:
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError / google.protobuf errors
        raise ModelError(f"{path}: not a readable ONNX file ({type(exc).__name__}: {exc})") from exc
    props = {p.key: p.value for p in model.metadata_props}
    if METADATA_KEY not in props:
        raise ModelError(f"{path}: ONNX file has no flare-rt metadata; import it with "
                         "'flare-rt import-nnunet' or export it with 'flare-rt export'")
    return BundleMeta.from_json(props[METADATA_KEY], where=str(path))


def write_bundle(model, meta: BundleMeta, path: str | Path) -> Path:
    """Attach ``meta`` to an ``onnx.ModelProto`` and save it atomically."""
    import onnx

    path = Path(path)
    del model.metadata_props[:]
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, meta.to_json()
    model.doc_string = f"flare-rt bundle: {meta.name}"
    with atomic_path(path) as tmp:
        onnx.save(model, str(tmp))
    return path


def describe(meta: BundleMeta, path: Path | None = None) -> str:
    """Human-readable summary for ``flare-rt info``."""
    lines = []
    if path is not None:
        lines.append(f"bundle      {path} ({path.stat().st_size / 1e6:.1f} MB)")
    lines += [
        f"name        {meta.name}" + ("  [coarse DEMONSTRATION model, not accurate]" if meta.demo else ""),
        f"precision   {meta.precision}",
        f"spacing     {' x '.join(f'{s:g}' for s in meta.spacing)} mm (network axis order)",
        f"patch       {' x '.join(str(p) for p in meta.patch_size)}",
        f"tile step   {meta.tile_step}",
        f"mirroring   axes {list(meta.mirror_axes)} (TTA default {'on' if meta.tta else 'off'})",
        f"orientation {meta.orientation}",
        f"normalise   CT clip [{meta.normalization.lower:g}, {meta.normalization.upper:g}], "
        f"mean {meta.normalization.mean:g}, std {meta.normalization.std:g}",
        f"network     features {meta.architecture.get('features_per_stage')}, "
        f"convs/stage {meta.architecture.get('n_conv_per_stage')}",
        "labels      " + ", ".join(f"{k}={v}" for k, v in sorted(meta.labels.items())),
        f"source      {meta.source}",
        f"producer    {meta.producer}",
    ]
    if meta.description:
        lines.append(f"about       {meta.description}")
    if meta.precision_record is not None:
        lines += meta.precision_record.describe()
    return "\n".join(lines)
