"""Training configuration: frozen dataclasses, one per concern, with the paper's values as defaults.

A model is one frozen dataclass per network (:class:`BigModel`, :class:`SmallModel`, :class:`TinyModel`,
paper Tables 1, 2, 4 and 5); :class:`TrainConfig` composes a model with the data, schedule,
optimiser, augmentation, loss and runtime settings. JSON is only the saved form: ``{"model":
{"preset": "small"}, "data": {...}, ...}`` with every omitted field at its default and relative paths
resolved against the JSON file's folder.
"""
from __future__ import annotations

import json
import math
import types
import typing
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, ClassVar

from ..atomic import atomic_path
from ..errors import ConfigError
from ..nets.config import UNetConfig, big_unet_config, small_unet_config

Triple = tuple[int, int, int]

_BIG = big_unet_config()
_SMALL = small_unet_config()


@dataclass(frozen=True)
class ModelConfig:
    """A network with its input spacing and patch (network axis order z, y, x)."""

    preset: ClassVar[str] = "custom"
    features_per_stage: tuple[int, ...]
    kernel_sizes: tuple[Triple, ...]
    strides: tuple[Triple, ...]
    n_conv_per_stage: tuple[int, ...]
    n_conv_per_stage_decoder: tuple[int, ...]
    spacing: tuple[float, float, float]  # mm
    patch_size: Triple
    tta: bool  # the bundle's default for mirroring test-time augmentation
    # As the runtime (flare_rt.orientation). "none": axial slice order with the stored flips, as nnU-Net on
    # axially stored CTs; "stored": the array order whatever it is; a code such as "LPS" reorients
    # every case, for data stored in mixed orientations.
    orientation: str = "none"

    def __post_init__(self) -> None:
        from ..orientation import is_code

        if not is_code(self.orientation):
            raise ConfigError(f"model.orientation must be 'none', 'stored' or an upper-case code such as 'LPS', "
                              f"got {self.orientation!r}")
        self.unet(15)  # raises ModelError on inconsistent stage lists
        if len(self.spacing) != 3 or min(self.spacing) <= 0:
            raise ConfigError(f"model.spacing must be three positive mm values (z, y, x), got {self.spacing}")
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ConfigError(f"model.patch_size must be three positive ints (z, y, x), got {self.patch_size}")
        factor = self.downsampling()
        bad = [p for p, f in zip(self.patch_size, factor) if p % f]
        if bad:
            fix = tuple(max(f, round(p / f) * f) for p, f in zip(self.patch_size, factor))
            raise ConfigError(f"model.patch_size {self.patch_size} is not divisible by the total stride {factor} "
                              f"of the network; use e.g. {fix}")

    def downsampling(self) -> Triple:
        """Total stride per axis (the patch must be a multiple of it)."""
        return tuple(math.prod(s[a] for s in self.strides) for a in range(3))  # type: ignore[return-value]

    def unet(self, num_classes: int, deep_supervision: bool = True) -> UNetConfig:
        return UNetConfig(num_classes=num_classes, features_per_stage=tuple(self.features_per_stage),
                          kernel_sizes=tuple(tuple(k) for k in self.kernel_sizes),
                          strides=tuple(tuple(s) for s in self.strides),
                          n_conv_per_stage=tuple(self.n_conv_per_stage),
                          n_conv_per_stage_decoder=tuple(self.n_conv_per_stage_decoder),
                          deep_supervision=deep_supervision)

    def output_shapes(self) -> list[Triple]:
        """Shapes of the deep-supervision outputs, finest first (one per decoder stage)."""
        shapes, cur = [], tuple(self.patch_size)
        for s in self.strides[:-1]:
            cur = tuple(c // k for c, k in zip(cur, s))
            shapes.append(cur)
        return shapes  # type: ignore[return-value]


@dataclass(frozen=True)
class BigModel(ModelConfig):
    """Paper Table 1 and 4: 32 base features, 3 convs/stage, 5 downsamplings, 2.5x0.8x0.8 mm, 48x224x224, TTA."""

    preset: ClassVar[str] = "big"
    features_per_stage: tuple[int, ...] = _BIG.features_per_stage
    kernel_sizes: tuple[Triple, ...] = _BIG.kernel_sizes
    strides: tuple[Triple, ...] = _BIG.strides
    n_conv_per_stage: tuple[int, ...] = _BIG.n_conv_per_stage
    n_conv_per_stage_decoder: tuple[int, ...] = _BIG.n_conv_per_stage_decoder
    spacing: tuple[float, float, float] = (2.5, 0.8, 0.8)
    patch_size: Triple = (48, 224, 224)
    tta: bool = True


@dataclass(frozen=True)
class SmallModel(ModelConfig):
    """Paper Table 2 and 5: 16 base features, 2 convs/stage, 4 downsamplings, 4.0x1.2x1.2 mm, 32x128x192, no TTA."""

    preset: ClassVar[str] = "small"
    features_per_stage: tuple[int, ...] = _SMALL.features_per_stage
    kernel_sizes: tuple[Triple, ...] = _SMALL.kernel_sizes
    strides: tuple[Triple, ...] = _SMALL.strides
    n_conv_per_stage: tuple[int, ...] = _SMALL.n_conv_per_stage
    n_conv_per_stage_decoder: tuple[int, ...] = _SMALL.n_conv_per_stage_decoder
    spacing: tuple[float, float, float] = (4.0, 1.2, 1.2)
    patch_size: Triple = (32, 128, 192)
    tta: bool = False


@dataclass(frozen=True)
class TinyModel(ModelConfig):
    """For tests and CPU smoke runs: 8/16/32 features, 2 downsamplings, 4.0x2.4x2.4 mm, 16x64x64."""

    preset: ClassVar[str] = "tiny"
    features_per_stage: tuple[int, ...] = (8, 16, 32)
    kernel_sizes: tuple[Triple, ...] = ((1, 3, 3), (3, 3, 3), (3, 3, 3))
    strides: tuple[Triple, ...] = ((1, 1, 1), (1, 2, 2), (2, 2, 2))
    n_conv_per_stage: tuple[int, ...] = (2, 2, 2)
    n_conv_per_stage_decoder: tuple[int, ...] = (2, 2)
    spacing: tuple[float, float, float] = (4.0, 2.4, 2.4)
    patch_size: Triple = (16, 64, 64)
    tta: bool = False


MODEL_PRESETS: dict[str, type[ModelConfig]] = {c.preset: c for c in (ModelConfig, BigModel, SmallModel, TinyModel)}


@dataclass(frozen=True)
class DataConfig:
    """Where the cases are. ``dataset`` is a FLARE23 or nnU-Net raw folder; ``index`` the dataset index
    JSON (built from ``dataset`` when missing); ``cache`` the preprocessed cases (default: beside the
    index, one folder per spacing)."""

    dataset: str | None = None
    index: str | None = None
    cache: str | None = None
    images: str = "imagesTr"
    labels: str = "labelsTr"
    unlabelled: str = "unlabeledTr"
    annotations: str | None = None  # JSON {case: [label ids]} declaring the annotated classes per case
    train_cases: tuple[str, ...] = ()  # empty: every labelled case not in val_cases
    val_cases: tuple[str, ...] = ()  # empty: a val_fraction of the labelled cases
    val_fraction: float = 0.2
    preprocess_workers: int = 2

    def __post_init__(self) -> None:
        if self.dataset is None and self.index is None:
            raise ConfigError("data needs 'dataset' (a FLARE23 or nnU-Net raw folder) or 'index' (a dataset "
                              "index JSON); pass --dataset PATH or set data.dataset in the config")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.preprocess_workers < 1:
            raise ConfigError(f"data.preprocess_workers must be >= 1, got {self.preprocess_workers}")


@dataclass(frozen=True)
class ScheduleConfig:
    """Paper Tables 4/5 and nnU-Net: 1000 epochs x 250 iterations, batch 2, 1/3 foreground patches."""

    epochs: int = 1000
    iterations_per_epoch: int = 250
    val_iterations: int = 50
    batch_size: int = 2  # global: split over the processes of a DDP run
    oversample_foreground: float = 1 / 3
    checkpoint_every: int = 50  # epochs
    val_every: int = 1  # epochs

    def __post_init__(self) -> None:
        for name in ("epochs", "iterations_per_epoch", "batch_size", "checkpoint_every", "val_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"schedule.{name} must be >= 1, got {getattr(self, name)}")
        if self.val_iterations < 0:
            raise ConfigError(f"schedule.val_iterations must be >= 0, got {self.val_iterations}")
        if not 0 <= self.oversample_foreground <= 1:
            raise ConfigError(f"schedule.oversample_foreground must be in [0, 1], got {self.oversample_foreground}")


@dataclass(frozen=True)
class OptimConfig:
    """SGD with Nesterov momentum 0.99, lr 0.01 with poly decay (0.9), He init, gradient clipping at 12."""

    lr: float = 0.01
    momentum: float = 0.99
    nesterov: bool = True
    weight_decay: float = 3e-5
    poly_exponent: float = 0.9
    grad_clip: float = 12.0
    he_negative_slope: float = 1e-2

    def __post_init__(self) -> None:
        if self.lr <= 0 or not 0 <= self.momentum < 1 or self.grad_clip <= 0:
            raise ConfigError(f"optim needs lr > 0, 0 <= momentum < 1 and grad_clip > 0, got lr {self.lr}, "
                              f"momentum {self.momentum}, grad_clip {self.grad_clip}")


@dataclass(frozen=True)
class AugmentConfig:
    """On-the-fly augmentation (paper: additive brightness, gamma, rotation, scaling, elastic; plus mirroring).
    Probabilities are per patch; geometry is drawn in millimetres, so rotations are rigid on anisotropic grids."""

    p_rotation: float = 0.2
    rotation_deg: tuple[float, float, float] = (30.0, 30.0, 30.0)  # max angle about the z, y, x axes
    p_scale: float = 0.2
    scale_range: tuple[float, float] = (0.7, 1.4)  # zoom: > 1 enlarges the content
    p_elastic: float = 0.2
    elastic_grid_mm: float = 48.0  # control-point spacing of the smooth displacement field
    elastic_magnitude_mm: float = 6.0  # max std of the control-point displacements
    p_brightness: float = 0.15
    brightness_sigma: float = 0.1  # additive, in normalised intensity units
    p_gamma: float = 0.3
    gamma_range: tuple[float, float] = (0.7, 1.5)
    p_gamma_invert: float = 0.1
    p_mirror: float = 0.5  # per axis
    mirror_axes: tuple[int, ...] = (0, 1, 2)

    def __post_init__(self) -> None:
        probs = {f.name: getattr(self, f.name) for f in fields(self) if f.name.startswith("p_")}
        bad = {k: v for k, v in probs.items() if not 0 <= v <= 1}
        if bad:
            raise ConfigError(f"augment probabilities must be in [0, 1], got {bad}")
        lo, hi = self.scale_range
        if not 0 < lo <= hi:
            raise ConfigError(f"augment.scale_range must be 0 < low <= high, got {self.scale_range}")
        glo, ghi = self.gamma_range
        if not 0 < glo <= ghi:
            raise ConfigError(f"augment.gamma_range must be 0 < low <= high, got {self.gamma_range}")
        if any(a not in (0, 1, 2) for a in self.mirror_axes):
            raise ConfigError(f"augment.mirror_axes must be among (0, 1, 2), got {self.mirror_axes}")
        if self.elastic_grid_mm <= 0 or self.elastic_magnitude_mm < 0:
            raise ConfigError("augment.elastic_grid_mm must be > 0 and elastic_magnitude_mm >= 0, got "
                              f"{self.elastic_grid_mm}, {self.elastic_magnitude_mm}")

    @classmethod
    def none(cls) -> "AugmentConfig":
        """No augmentation at all (validation patches, tests)."""
        return cls(p_rotation=0, p_scale=0, p_elastic=0, p_brightness=0, p_gamma=0, p_gamma_invert=0, p_mirror=0)


@dataclass(frozen=True)
class LossConfig:
    """Dice + cross-entropy with deep supervision. ``marginal``: classes a case does not annotate are
    merged into background (for partial labels); a fully annotated case gets the plain loss either way.
    ``never_annotated_absent``: a class that no training case annotates is learnt as absent everywhere,
    as nnU-Net's network has no output for a class its dataset lacks (left out of every case, its output
    would be untrained and could win the argmax anywhere, e.g. a tumour output of an organs-only model)."""

    marginal: bool = True
    never_annotated_absent: bool = True
    ce_weight: float = 1.0
    dice_weight: float = 1.0
    batch_dice: bool = True
    smooth: float = 1e-5
    deep_supervision: bool = True


@dataclass(frozen=True)
class RuntimeConfig:
    device: str = "auto"  # auto, cpu, cuda
    amp: bool = True  # mixed precision on CUDA (ignored on the CPU)
    num_workers: int = 2  # background data-loading processes per training process
    seed: int = 0
    progress: bool = True
    export: bool = True  # export and verify the bundle at the end
    threads: int | None = None  # torch CPU threads (None: torch's default)
    ddp_timeout_min: float = 120.0

    def __post_init__(self) -> None:
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"runtime.device must be auto, cpu or cuda, got {self.device!r}")
        if self.num_workers < 0:
            raise ConfigError(f"runtime.num_workers must be >= 0, got {self.num_workers}")


@dataclass(frozen=True)
class TrainConfig:
    name: str
    model: ModelConfig
    data: DataConfig
    output: str
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    init_weights: str | None = None  # a training checkpoint (.pt) or bundle (.onnx) to start from

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["model"] = {"preset": type(self.model).preset, **d["model"]}
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def with_(self, **changes) -> "TrainConfig":
        return replace(self, **changes)


_SECTIONS: dict[str, type] = {"data": DataConfig, "schedule": ScheduleConfig, "optim": OptimConfig,
                              "augment": AugmentConfig, "loss": LossConfig, "runtime": RuntimeConfig}
_PATH_KEYS = {"data": ("dataset", "index", "cache", "annotations")}


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


# -- type checks driven by the dataclasses' field types -------------------------------------------------
def _kind(tp: Any) -> tuple[str, str]:
    """(singular, plural) description of a field type, in JSON terms: ``int`` → ("an integer", "integers")."""
    if tp is type(None):
        return "null", "nulls"
    if tp is bool:
        return "true or false", "true/false values"
    if tp is int:
        return "an integer", "integers"
    if tp is float:
        return "a finite number", "finite numbers"
    if tp is str:
        return "a string", "strings"
    args = typing.get_args(tp)
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return " or ".join(_kind(a)[0] for a in args), " or ".join(_kind(a)[1] for a in args)
    if typing.get_origin(tp) is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            one = f"a list of {_kind(args[0])[1]}"
        elif len(set(args)) == 1:
            one = f"a list of {len(args)} {_kind(args[0])[1]}"
        else:
            one = f"a list [{', '.join(_kind(a)[0] for a in args)}]"
        return one, "lists" + one[len("a list"):]
    return getattr(tp, "__name__", str(tp)), getattr(tp, "__name__", str(tp))


def _fits(value: Any, tp: Any) -> bool:
    """Whether a JSON value (lists already made tuples) has the field type ``tp``: ints are no bools, a
    number is any finite int or float, a tuple has the right length and element types."""
    if tp is Any:
        return True
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if tp is str:
        return isinstance(value, str)
    args = typing.get_args(tp)
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return any(_fits(value, a) for a in args)
    if typing.get_origin(tp) is tuple:
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_fits(v, args[0]) for v in value)
        return len(value) == len(args) and all(_fits(v, a) for v, a in zip(value, args))
    return isinstance(value, tp) if isinstance(tp, type) else True


def _shown(value: Any) -> str:
    try:
        return json.dumps(_lists(value), allow_nan=True)
    except (TypeError, ValueError):
        return repr(value)


def _lists(value: Any) -> Any:
    return [_lists(v) for v in value] if isinstance(value, tuple) else value


def _require_object(d: Any) -> None:
    if not isinstance(d, dict):
        raise ConfigError(f"a training config must be a JSON object (see flare_rt/train/configs/), got {_shown(d)}")


def check_type(key: str, value: Any, tp: Any) -> None:
    """:class:`ConfigError` naming ``key``, the value and the expected type unless ``value`` fits ``tp``."""
    if not _fits(value, tp):
        raise ConfigError(f"{key} must be {_kind(tp)[0]}, got {_shown(value)}; fix it in the config JSON or with "
                          f"--set {key}=VALUE (a JSON value: strings in double quotes)")


def _build(cls: type, d: dict[str, Any], where: str, section: str):
    """``cls`` from the JSON object ``d`` of config section ``section`` (``where`` names it in messages);
    every value is checked against the field's type before the dataclass checks its range."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where} must be a JSON object, got {_shown(d)}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}; valid keys are {sorted(known)}")
    hints = typing.get_type_hints(cls)
    values = {k: _tuples(v) for k, v in d.items()}
    for k, v in values.items():
        check_type(f"{section}.{k}", v, hints[k])
    try:
        return cls(**values)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def model_from_dict(d: dict[str, Any]) -> ModelConfig:
    if not isinstance(d, dict):
        raise ConfigError(f"model must be a JSON object such as {{\"preset\": \"tiny\"}}, got {_shown(d)}; presets: "
                          f"{sorted(MODEL_PRESETS)}")
    d = dict(d)
    preset = d.pop("preset", "custom")
    if not isinstance(preset, str) or preset not in MODEL_PRESETS:
        raise ConfigError(f"model.preset must be one of {sorted(MODEL_PRESETS)}, got {_shown(preset)}")
    return _build(MODEL_PRESETS[preset], d, f"model ({preset})", "model")


def config_from_dict(d: dict[str, Any], base_dir: str | Path | None = None) -> TrainConfig:
    """Build a :class:`TrainConfig`; relative data paths and ``output`` are resolved against ``base_dir``."""
    _require_object(d)
    d = dict(d)
    required = [k for k in ("name", "model", "data", "output") if d.get(k) is None]
    if required:
        raise ConfigError(f"training config lacks {required}; set them in the JSON (see flare_rt/train/configs/) "
                          "or pass --output DIR / --dataset DIR")
    unknown = sorted(set(d) - {f.name for f in fields(TrainConfig)})
    if unknown:
        raise ConfigError(f"training config: unknown keys {unknown}")

    check_type("output", d["output"], str)
    check_type("init_weights", d.get("init_weights"), str | None)

    def resolve(p):
        if p is None or base_dir is None or Path(p).is_absolute():
            return p
        return str((Path(base_dir) / p).resolve())

    for section, keys in _PATH_KEYS.items():
        if isinstance(d.get(section), dict):  # anything else is refused by _build
            d[section] = {k: resolve(v) if k in keys and isinstance(v, str) else v for k, v in d[section].items()}
    kw: dict[str, Any] = {"name": str(d["name"]), "output": resolve(d["output"]),
                          "model": model_from_dict(d["model"]), "init_weights": resolve(d.get("init_weights"))}
    for section, cls in _SECTIONS.items():
        if section in d:
            kw[section] = _build(cls, d[section], section, section)
    return TrainConfig(**kw)


def load_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Read a JSON config; ``overrides`` are ``section.key=JSON`` strings (``schedule.epochs=10``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: training config not found; presets are in {CONFIG_DIR}")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from exc
    return config_from_dict(apply_overrides(d, overrides or []), base_dir=path.parent)


def apply_overrides(d: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``["schedule.epochs=10", "data.val_cases=[\\"a\\"]"]`` applied to a config dict (values parsed as
    JSON, else taken as strings)."""
    _require_object(d)
    d = json.loads(json.dumps(d))
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override must be KEY=VALUE (e.g. schedule.epochs=10), got {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        *parents, leaf = key.split(".")
        node = d
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p!r} is not a section")
        node[leaf] = value
    return d


def save_config(config: TrainConfig, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(config.to_json() + "\n")
    return path


CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def preset_path(name: str) -> Path:
    """The packaged JSON config of a preset (``big``, ``small``, ``tiny``)."""
    path = CONFIG_DIR / f"{name}.json"
    if not path.is_file():
        raise ConfigError(f"no packaged config {name!r}; available: "
                          f"{sorted(p.stem for p in CONFIG_DIR.glob('*.json'))}")
    return path
