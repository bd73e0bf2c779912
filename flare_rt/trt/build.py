"""Building a TensorRT engine from a bundle: one printable config, one function.

The network is **strongly typed** (TensorRT 10: the ``STRONGLY_TYPED`` creation flag; 11: always):
TensorRT keeps the precision the ONNX graph states, so an fp16 bundle (fp16 weights and activations,
Casts to fp32 around every InstanceNorm, see :mod:`flare_rt.onnx_graph`) gives an fp16 engine with
fp32 normalisation. No weak-typing flag (``BuilderFlag.FP16``, gone in TensorRT 11) is ever set.
Only the tile batch is dynamic: the profile is ``min_batch / opt_batch / max_batch`` × (C, *patch).
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import ConfigError, EngineError
from .runtime import create

log = logging.getLogger(__name__)

PRECISIONS = ("fp16", "fp32")
DEFAULT_WORKSPACE_MB = 1024


@dataclass(frozen=True)
class EngineConfig:
    """What to build. ``precision``: the engine's (an fp32 bundle converts to fp16 with the export's
    transform, an fp16 bundle widens exactly to fp32); ``workspace_mb`` bounds the scratch memory of
    the tactics TensorRT may pick; ``timing_cache``: None puts it beside the engines, one per GPU and
    TensorRT version (it only speeds up later builds)."""

    precision: str = "fp16"
    min_batch: int = 1
    opt_batch: int = 1
    max_batch: int = 1
    workspace_mb: int = DEFAULT_WORKSPACE_MB
    timing_cache: Path | None = None

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"engine precision must be one of {PRECISIONS}, got {self.precision!r}")
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ConfigError(f"engine batch profile must satisfy 1 <= min <= opt <= max, got "
                              f"{self.min_batch}/{self.opt_batch}/{self.max_batch}; pass --batch-size >= 1")
        if self.workspace_mb < 1:
            raise ConfigError(f"--workspace must be >= 1 MB, got {self.workspace_mb}")

    @classmethod
    def for_batch(cls, batch_size: int, precision: str = "fp16", workspace_mb: int = DEFAULT_WORKSPACE_MB,
                  timing_cache: Path | None = None) -> EngineConfig:
        """The profile the pipeline needs for ``--batch-size B``: min 1, opt = max = B."""
        if batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {batch_size}")
        return cls(precision, 1, batch_size, batch_size, workspace_mb,
                   Path(timing_cache) if timing_cache is not None else None)

    @property
    def profile(self) -> tuple[int, int, int]:
        return self.min_batch, self.opt_batch, self.max_batch

    def describe(self) -> str:
        d = asdict(self)
        return ", ".join(f"{k}={v}" for k, v in d.items())


def prepare_graph(model, bundle_precision: str, precision: str, where: str = "bundle"):
    """The ONNX graph to build ``precision`` from: checked to be an fp32/fp16 graph (no quantisation)
    and, for fp16, to keep every InstanceNorm in fp32."""
    from ..onnx_graph import non_fp32_norms, quantized_ops, to_fp16, to_fp32

    quantized = quantized_ops(model)
    if quantized or bundle_precision not in PRECISIONS:
        raise EngineError(f"{where}: a {bundle_precision!r} bundle{' with ' + ', '.join(quantized) if quantized else ''}"
                          f" is not an fp16/fp32 graph; the tensorrt backend builds fp16 or fp32 bundles only "
                          "(use another --backend for quantised models)")
    if precision == "fp32" and bundle_precision == "fp16":
        model = to_fp32(model)
    elif precision == "fp16" and bundle_precision == "fp32":
        log.warning("%s: converting an fp32 bundle to fp16 for TensorRT (InstanceNorm kept fp32); verify it first with "
                    "'flare-rt export %s OUT.onnx --precision fp16' and build from that", where, where)
        model = to_fp16(model)
    if precision == "fp16":
        bad = non_fp32_norms(model)
        if bad:
            raise EngineError(f"{where}: {len(bad)} InstanceNorm node(s) take fp16 input (first: {bad[0]}); a strongly "
                              "typed build would run them in fp16. Re-export the bundle with 'flare-rt export "
                              "--precision fp16', which keeps normalisation in fp32")
    return model


def _network_flags(trt) -> int:
    """``STRONGLY_TYPED`` where the enum has it (TensorRT 10 needs it; 11 accepts and ignores it)."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


def build_engine(onnx_bytes: bytes, input_name: str, config: EngineConfig, trt, logger,
                 timing_cache: bytes = b"") -> tuple[bytes, bytes]:
    """Serialized engine and updated timing cache for an ONNX graph whose only dynamic dimension is
    the batch. Raises :class:`EngineError` with TensorRT's own message when parsing or building fails."""
    builder = create(trt.Builder, logger, logger=logger, what="builder")
    network = builder.create_network(_network_flags(trt))
    parser = create(trt.OnnxParser, network, logger, logger=logger, what="ONNX parser")
    if not parser.parse(onnx_bytes):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineError(f"TensorRT could not parse the bundle's ONNX graph: {'; '.join(errors[:3]) or logger.last_error()}")
    if network.num_inputs != 1 or network.num_outputs != 1:
        raise EngineError(f"the bundle's graph has {network.num_inputs} inputs and {network.num_outputs} outputs; "
                          "a flare-rt bundle has one of each")
    inp = network.get_input(0)
    shape = tuple(int(d) for d in inp.shape)
    if inp.name != input_name or len(shape) < 2 or shape[0] != -1 or any(d < 1 for d in shape[1:]):
        raise EngineError(f"the bundle's input is {inp.name!r} with shape {shape}; expected {input_name!r} with shape "
                          "(-1, C, *patch): only the batch may be dynamic")
    cfg = builder.create_builder_config()
    cfg.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, config.workspace_mb << 20)
    cache = cfg.create_timing_cache(timing_cache)
    ok = cache is not None and cfg.set_timing_cache(cache, ignore_mismatch=False)
    if not ok and timing_cache:
        log.warning("the timing cache does not fit this TensorRT and GPU (or is damaged); starting an empty one")
        cache = cfg.create_timing_cache(b"")
        ok = cache is not None and cfg.set_timing_cache(cache, ignore_mismatch=False)
    if not ok:
        raise EngineError(f"TensorRT could not create a timing cache ({logger.last_error()})")
    profile = builder.create_optimization_profile()
    item = shape[1:]
    profile.set_shape(inp.name, (config.min_batch, *item), (config.opt_batch, *item), (config.max_batch, *item))
    cfg.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, cfg)
    if plan is None:
        raise EngineError(f"TensorRT could not build the engine: {logger.last_error()}")
    return bytes(memoryview(plan)), bytes(memoryview(cache.serialize()))
