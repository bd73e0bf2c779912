"""TensorRT backend: the bundle's engine for this GPU (cached, baked or built on first use, see
:mod:`flare_rt.trt.cache`) run on CuPy device buffers on the pipeline's stream. Needs TensorRT, CuPy
and numpy only: nothing on this path imports torch."""
from __future__ import annotations

from ..errors import BackendUnavailableError
from ..trt.build import PRECISIONS, EngineConfig
from .base import Backend, BackendOptions


class TensorRTBackend(Backend):
    name = "tensorrt"

    def __init__(self, bundle, options: BackendOptions):
        super().__init__(bundle, options)
        from ..trt.cache import EngineStore, load_engine, policy_from_env
        from ..gpu import import_cupy, use_pipeline_stream
        from ..trt.runtime import current_gpu, load_tensorrt

        precision = bundle.meta.precision
        if precision not in PRECISIONS:
            raise BackendUnavailableError(f"{bundle.path}: a {precision!r} bundle; the tensorrt backend builds fp16 or "
                                          "fp32 bundles only")
        if options.device != "cuda":
            raise BackendUnavailableError(f"the tensorrt backend runs on a CUDA GPU, not --device {options.device}")
        trt, cp = load_tensorrt(), import_cupy()
        use_pipeline_stream(cp)
        self.gpu = current_gpu(cp)
        self._cp = cp
        config = EngineConfig.for_batch(options.batch_size, precision)
        self.engine = load_engine(bundle, config, trt=trt, cp=cp, gpu=self.gpu, store=EngineStore.default(),
                                  policy=policy_from_env())
        self._runner = self.engine.runner
        self.input_dtype = self._runner.input_dtype
        self.tensorrt_version = str(trt.__version__)

    @property
    def xp(self):
        return self._cp

    def __call__(self, batch):
        return self._runner(batch)

    def close(self) -> None:
        if self._runner is not None:
            self._runner.close()
            self._runner = None

    def describe(self) -> str:
        return (f"tensorrt {self.tensorrt_version} on {self.gpu.describe()}, {self.bundle.meta.precision}, "
                f"{self.engine.describe()}")
