"""Running a TensorRT engine on CuPy device buffers.

The runner owns the engine's execution context. A call binds the batch's device pointer and the
output buffer's with ``set_tensor_address``, sets the input shape (only when it changes) and enqueues
``execute_async_v3`` on CuPy's current stream: no host copies, no synchronisation. The output buffer
is allocated once per batch shape and reused, so the array a call returns is overwritten by the next
call of the same shape (consume it first: the pipeline's blending does, on the same stream).
A batch larger than the engine's profile is run in slices of the profile's maximum, written into
the one output buffer.
"""
from __future__ import annotations

import logging

import numpy as np

from ..errors import ConfigError, EngineError
from .runtime import create

log = logging.getLogger(__name__)


class EngineRunner:
    def __init__(self, plan: bytes, trt, cp, logger, where: str = "engine"):
        self._cp, self._logger, self.where = cp, logger, where
        self._runtime = create(trt.Runtime, logger, logger=logger, what="runtime")
        engine = self._runtime.deserialize_cuda_engine(plan)
        if engine is None:
            raise EngineError(f"{where}: TensorRT {trt.__version__} cannot load this engine ({logger.last_error()}): it "
                              "was built for another GPU or TensorRT version, or the file is damaged; rebuild it with "
                              "'flare-rt build-engine BUNDLE --force'")
        self._engine = engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        if len(inputs) != 1 or len(outputs) != 1:
            raise EngineError(f"{where}: engine has inputs {inputs} and outputs {outputs}; a flare-rt engine has one "
                              "of each")
        self.input_name, self.output_name = inputs[0], outputs[0]
        self.input_dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(self.input_name)))
        self.output_dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(self.output_name)))
        lo, _, hi = (tuple(int(d) for d in s) for s in engine.get_tensor_profile_shape(self.input_name, 0))
        self.min_batch, self.max_batch = lo[0], hi[0]
        self.item_shape: tuple[int, ...] = hi[1:]
        self._context = engine.create_execution_context()
        if self._context is None:
            raise EngineError(f"{where}: TensorRT could not create an execution context ({logger.last_error()}); "
                              "is the GPU out of memory?")
        self._outputs: dict[tuple[int, ...], object] = {}  # batch shape -> reused output buffer
        self._bound_shape: tuple[int, ...] | None = None
        self._out_item: tuple[int, ...] | None = None
        self._warned_host = False

    def _set_shape(self, shape: tuple[int, ...]) -> None:
        if shape == self._bound_shape:
            return
        if not self._context.set_input_shape(self.input_name, shape):
            raise EngineError(f"{self.where}: TensorRT rejected input shape {shape} ({self._logger.last_error()})")
        self._bound_shape = shape
        if self._out_item is None:
            self._out_item = tuple(int(d) for d in self._context.get_tensor_shape(self.output_name))[1:]

    def __call__(self, batch):
        """(B, *item) device array → (B, K, *patch) device array of the engine's output dtype."""
        cp = self._cp
        host = isinstance(batch, np.ndarray)
        if host:  # the CPU pipeline: correct, but one upload and download per batch
            if not self._warned_host:
                log.warning("tensorrt backend given host (numpy) batches: each is copied to the GPU and back")
                self._warned_host = True
            batch = cp.asarray(batch)
        n = int(batch.shape[0]) if batch.ndim else 0
        if n < 1 or tuple(batch.shape[1:]) != self.item_shape:
            raise ConfigError(f"batch of shape {tuple(batch.shape)} does not fit the engine's (B >= 1, "
                              f"{', '.join(map(str, self.item_shape))})")
        if batch.dtype != self.input_dtype or not batch.flags.c_contiguous:
            batch = cp.ascontiguousarray(batch, dtype=self.input_dtype)
        stream = cp.cuda.get_current_stream()
        out = self._outputs.get(batch.shape)
        for s in range(0, n, self.max_batch):
            e = min(n, s + self.max_batch)
            self._set_shape((e - s, *self.item_shape))
            if out is None:
                out = self._outputs[batch.shape] = cp.empty((n, *self._out_item), dtype=self.output_dtype)
            ctx = self._context
            ok = (ctx.set_tensor_address(self.input_name, batch[s:e].data.ptr)
                  and ctx.set_tensor_address(self.output_name, out[s:e].data.ptr))
            if not ok or not ctx.execute_async_v3(stream.ptr):
                raise EngineError(f"{self.where}: TensorRT inference failed ({self._logger.last_error()})")
        return out.get() if host else out

    def close(self) -> None:
        self._outputs.clear()
        self._context = self._engine = self._runtime = None
