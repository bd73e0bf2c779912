"""OpenVINO backend (CPU): the bundle's ONNX read directly, compiled per batch size for the fixed patch
shape, with an explicit inference precision.

OpenVINO picks bf16 by itself on CPUs that have it, so the precision is always asked for: ``f32``
for fp32/fp16 bundles (fp16 weights widened exactly, as the ONNX Runtime backend does), ``bf16`` for
bf16 bundles where the CPU has bf16 instructions (AVX512_BF16 or AMX; otherwise f32 and a log line),
and int8 bundles (QDQ graphs) run their quantised layers in int8 and the rest in f32.
Settings measured in ``bench/cpu_backends.py``: one stream, LATENCY hint, synchronous requests.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from ..errors import BackendUnavailableError, ConfigError
from ..onnx_graph import pooled_instance_norm, to_fp32
from ..precision import COMPUTE
from ..sigstack import kept_signal_stack
from .base import Backend, BackendOptions

log = logging.getLogger(__name__)

INSTALL = "pip install 'flare-rt[openvino]' (or pip install openvino)"
#: compute precision -> OpenVINO INFERENCE_PRECISION_HINT (int8 layers follow the graph's QDQ nodes)
HINTS = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}


@dataclass(frozen=True)
class OvSettings:
    """Compile settings; the defaults are the fastest measured in bench/cpu_backends.py."""

    performance_hint: str = "LATENCY"  # one stream using every thread: one synchronous request per batch
    pooled_norm_min_voxels: int | None = 1 << 18  # InstanceNorm over more voxels: short sums (accuracy)


def _ov():
    try:
        import openvino
    except ImportError as exc:
        raise BackendUnavailableError(f"the openvino backend needs OpenVINO, which is not installed: {INSTALL}") \
            from exc
    return openvino


def cpu_core():
    """An OpenVINO ``Core`` with its CPU plugin loaded. Loading the plugin is what swaps this thread's
    alternate signal stack (compiling and inferring do not), so it happens here, with the stack kept
    (:mod:`flare_rt.sigstack`)."""
    with kept_signal_stack():
        core = _ov().Core()
        core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    return core


def cpu_has_bf16(core=None) -> bool:
    """Whether OpenVINO's CPU plugin has bf16 kernels here (AVX512_BF16 or AMX)."""
    core = core or cpu_core()
    return "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def compute_precision(bundle_precision: str, asked: str | None, has_bf16: bool) -> tuple[str, str | None]:
    """The precision the network is computed in, and a log line when it differs from what was asked."""
    want = asked or COMPUTE.get(bundle_precision)
    if want is None or want not in HINTS:
        raise ConfigError(f"the openvino backend computes in {sorted(HINTS)}; got {want or bundle_precision!r}")
    if want == "int8" and bundle_precision != "int8":
        raise ConfigError("int8 arithmetic needs an int8 bundle; make one with 'flare-rt quantize --precision int8'")
    if want == "bf16" and not has_bf16:
        return "fp32", "this CPU has no bf16 instructions (AVX512_BF16/AMX): computing the bf16 bundle in fp32"
    return want, None


class OpenVinoBackend(Backend):
    name = "openvino"

    def __init__(self, bundle, options: BackendOptions, settings: OvSettings = OvSettings()):
        super().__init__(bundle, options)
        ov = _ov()
        if options.device != "cpu":
            raise BackendUnavailableError(f"the openvino backend runs on the CPU, not {options.device}; "
                                          "use --device cpu or another backend")
        self._ov = ov
        self._core = cpu_core()
        self.compute, note = compute_precision(bundle.meta.precision, options.precision, cpu_has_bf16(self._core))
        if note:
            log.info("%s", note)
        model = to_fp32(bundle.load_onnx())
        if settings.pooled_norm_min_voxels is not None:
            model = pooled_instance_norm(model, settings.pooled_norm_min_voxels)
        self._model = self._core.read_model(model.SerializeToString(), b"")
        self._patch = tuple(int(p) for p in bundle.meta.patch_size)
        self._config = {"INFERENCE_PRECISION_HINT": HINTS[self.compute], "PERFORMANCE_HINT": settings.performance_hint}
        if options.threads:
            self._config["INFERENCE_NUM_THREADS"] = int(options.threads)
        self._requests: dict[int, object] = {}
        self._request(1)  # compile now: a bad graph fails at load time, not at the first tile

    def _request(self, batch: int):
        req = self._requests.get(batch)
        if req is None:
            model = self._model.clone()
            model.reshape([batch, int(self._model.inputs[0].partial_shape[1].get_length()), *self._patch])
            compiled = self._core.compile_model(model, "CPU", self._config)
            got, want = compiled.get_property("INFERENCE_PRECISION_HINT"), getattr(self._ov.Type, HINTS[self.compute])
            if got != want:
                raise BackendUnavailableError(f"OpenVINO compiled the network in {got}, not the {want} asked for")
            req = self._requests[batch] = compiled.create_infer_request()
        return req

    @property
    def inference_precision(self) -> str:
        """The precision OpenVINO compiled the network in (e.g. ``f32``, ``bf16``)."""
        return str(self._request(1).get_compiled_model().get_property("INFERENCE_PRECISION_HINT").to_string())

    def __call__(self, batch):
        x = np.ascontiguousarray(batch, dtype=np.float32)
        req = self._request(len(x))
        # the request's own output buffer, no copy: valid until the next call (see Backend), as TensorRT's
        return req.infer({0: x}, share_inputs=True, share_outputs=True)[0]

    def describe(self) -> str:
        threads = self._config.get("INFERENCE_NUM_THREADS", "default")
        return f"openvino {self._ov.__version__.split('-')[0]} on cpu ({self.compute}, {threads} threads)"

    def close(self) -> None:
        self._requests.clear()
        self._model = None
