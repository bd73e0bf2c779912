"""ONNX Runtime backend (CPU execution provider; CUDA/TensorRT providers where onnxruntime-gpu is installed)."""
from __future__ import annotations

import logging

import numpy as np

from ..errors import BackendUnavailableError
from ..onnx_graph import to_fp32
from .base import Backend, BackendOptions

log = logging.getLogger(__name__)


def _ort():
    try:
        import onnxruntime as ort
    except ImportError as exc:  # pragma: no cover - base dependency
        raise BackendUnavailableError("onnxruntime is not installed: pip install onnxruntime "
                                      "(or onnxruntime-gpu for CUDA)") from exc
    return ort


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self, bundle, options: BackendOptions):
        super().__init__(bundle, options)
        ort = _ort()
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
