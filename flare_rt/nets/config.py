"""U-Net architecture configs (nnU-Net ``PlainConvUNet`` kwargs): plain data, importable without torch."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from ..errors import ModelError
from ..labels import NUM_CLASSES


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of a plain-convolution U-Net (nnU-Net ``PlainConvUNet`` kwargs)."""

    in_channels: int = 1
    num_classes: int = NUM_CLASSES
    features_per_stage: tuple[int, ...] = (16, 32, 64, 128, 256)
    kernel_sizes: tuple[tuple[int, int, int], ...] = ((1, 3, 3),) + ((3, 3, 3),) * 4
    strides: tuple[tuple[int, int, int], ...] = ((1, 1, 1),) + ((2, 2, 2),) * 4
    n_conv_per_stage: tuple[int, ...] = (2, 2, 2, 2, 2)
    n_conv_per_stage_decoder: tuple[int, ...] = (2, 2, 2, 2)
    norm_eps: float = 1e-5
    negative_slope: float = 0.01
    deep_supervision: bool = False

    def __post_init__(self) -> None:
        n = len(self.features_per_stage)
        lengths = {
            "kernel_sizes": len(self.kernel_sizes),
            "strides": len(self.strides),
            "n_conv_per_stage": len(self.n_conv_per_stage),
        }
        bad = {k: v for k, v in lengths.items() if v != n}
        if bad or len(self.n_conv_per_stage_decoder) != n - 1:
            raise ModelError(
                f"U-Net config is inconsistent: {n} stages but {bad or ''} "
                f"n_conv_per_stage_decoder has {len(self.n_conv_per_stage_decoder)} entries (expected {n - 1})"
            )

    @property
    def n_stages(self) -> int:
        return len(self.features_per_stage)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        tup = lambda v: tuple(tuple(x) if isinstance(x, (list, tuple)) else x for x in v)  # noqa: E731
        kw = dict(d)
        for key in ("features_per_stage", "kernel_sizes", "strides", "n_conv_per_stage", "n_conv_per_stage_decoder"):
            if key in kw:
                kw[key] = tup(kw[key])
        return cls(**kw)


def small_unet_config(num_classes: int = NUM_CLASSES) -> UNetConfig:
    """The paper's small network: 16 base features, 2 convs/stage, 4 downsamplings."""
    return UNetConfig(num_classes=num_classes)


def big_unet_config(num_classes: int = NUM_CLASSES) -> UNetConfig:
    """The paper's big network: 32 base features (capped at 320), 3 convs/stage, 5 downsamplings."""
    feats = tuple(min(32 * 2**i, 320) for i in range(6))
    return UNetConfig(
        num_classes=num_classes,
        features_per_stage=feats,
        kernel_sizes=((1, 3, 3),) + ((3, 3, 3),) * 5,
        strides=((1, 1, 1), (1, 2, 2)) + ((2, 2, 2),) * 4,
        n_conv_per_stage=(3,) * 6,
        n_conv_per_stage_decoder=(3,) * 5,
    )
