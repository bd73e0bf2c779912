"""ONNX Runtime backend (CPU execution provider; CUDA/TensorRT providers where onnxruntime-gpu is installed)."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np

from ..errors import BackendUnavailableError
from ..onnx_graph import to_fp32
from .base import Backend, BackendOptions

log = logging.getLogger(__name__)


#: ONNX Runtime's own switch for its telemetry (1DS events, read when the library loads).
TELEMETRY_ENV = "ORT_DISABLE_TELEMETRY"


def import_onnxruntime():
    """``import onnxruntime``, with its telemetry off unless the caller set :data:`TELEMETRY_ENV` itself.

    On Linux, ONNX Runtime 1.32 starts telemetry when it loads: it writes a device id and an event
    database (1DS events) under ``$XDG_CACHE_HOME`` or ``~/.cache/Microsoft/DeveloperTools`` and a
    session file in ``$TMPDIR``. A runtime that reads patient scans, often on read-only or
    offline machines (the challenge container), writes only its outputs and its own cache, and sends
    nothing: ``ORT_DISABLE_TELEMETRY=0`` in the environment turns it back on."""
    os.environ.setdefault(TELEMETRY_ENV, "1")
    try:
        import onnxruntime as ort
    except ImportError as exc:  # pragma: no cover - base dependency
        raise BackendUnavailableError("onnxruntime is not installed: pip install onnxruntime "
                                      "(or onnxruntime-gpu for CUDA)") from exc
    return ort


@dataclass(frozen=True)
class CpuSettings:
    """ONNX Runtime CPU session settings; the defaults are the fastest measured in bench/cpu_backends.py."""

    graph_optimization: str = "all"  # basic, extended, all (layout transforms and fusions)
    inter_threads: int = 1  # one graph: no parallel branches worth a second pool
    mem_arena: bool = True  # keep freed activations for the next tile (same shapes every call)
    mem_pattern: bool = True  # plan activation memory once for the fixed patch shape
    spinning: bool = True  # worker threads spin between operators instead of sleeping


def cpu_session_options(ort, threads: int | None, settings: CpuSettings = CpuSettings()):
    levels = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    so = ort.SessionOptions()
    so.graph_optimization_level = levels[settings.graph_optimization]
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if threads:
        so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = settings.inter_threads
    so.enable_cpu_mem_arena = settings.mem_arena
    so.enable_mem_pattern = settings.mem_pattern
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if settings.spinning else "0")
    so.log_severity_level = 3
    return so


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self, bundle, options: BackendOptions, settings: CpuSettings = CpuSettings()):
        super().__init__(bundle, options)
        ort = import_onnxruntime()
        available = ort.get_available_providers()
        if options.device == "cuda":
            if "CUDAExecutionProvider" not in available:
                raise BackendUnavailableError(
                    f"onnxruntime has no CUDA provider here (available: {available}); "
                    "pip install onnxruntime-gpu, or use --device cpu")
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        model = bundle.load_onnx()
        if options.device == "cpu":
            model = to_fp32(model)  # no fp16 convolution kernels on x86 CPUs
            so = cpu_session_options(ort, options.threads, settings)
            if bundle.meta.precision == "bf16":
                log.info("onnxruntime computes bf16 bundles in fp32 (bf16 arithmetic: --backend openvino)")
        else:
            so = ort.SessionOptions()
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            if options.threads:
                so.intra_op_num_threads = int(options.threads)
                so.inter_op_num_threads = 1
            so.log_severity_level = 3
        self._session = ort.InferenceSession(model.SerializeToString(), so, providers=providers)
        inp = self._session.get_inputs()[0]
        self._input = inp.name
        self._dtype = np.float16 if "float16" in inp.type else np.float32

    def __call__(self, batch):
        x = np.ascontiguousarray(batch, dtype=self._dtype)
        out = self._session.run(None, {self._input: x})[0]
        return out.astype(np.float32, copy=False)

    def close(self) -> None:
        self._session = None
