"""PyTorch backend (CPU/CUDA). The network is rebuilt from the bundle's architecture and its weights
read from the bundle's ONNX initializers (one copy of the weights).

On CUDA it computes in fp16 with InstanceNorm in fp32, replays the fixed-shape forward as a CUDA graph,
takes and returns CuPy arrays through DLPack (no copies, no host), and shares one memory pool and one
stream with CuPy (CuPy allocates through torch's caching allocator)."""
from __future__ import annotations

import logging
import os

import numpy as np

from ..errors import BackendUnavailableError
from ..gpu import import_cupy, share_torch_pool_and_stream
from ..nets import network_from_bundle
from ..nets.build import half_with_fp32_norm
from ..precision import require_float_weights
from .base import Backend, BackendOptions

log = logging.getLogger(__name__)


def allocator_settings(environ) -> None:
    """Expandable segments for torch's CUDA caching allocator unless the user configured it: blocks of
    varying size are mapped into growing segments instead of cached in fixed ones, which took the reserved
    peak of a ts269 run from 1286 to 1118 MiB (H200, same speed). Read when the allocator starts, so set
    before the first CUDA allocation."""
    if "PYTORCH_CUDA_ALLOC_CONF" not in environ and "PYTORCH_ALLOC_CONF" not in environ:
        environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"


def _torch():
    try:
        import torch
    except ImportError as exc:
        raise BackendUnavailableError("the torch backend needs PyTorch: pip install 'flare-rt[torch]'") from exc
    return torch


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, bundle, options: BackendOptions):
        super().__init__(bundle, options)
        require_float_weights(bundle.meta, bundle.path, "the torch backend", BackendUnavailableError)
        torch = _torch()
        self._torch = torch
        cuda = options.device == "cuda"
        if cuda:
            allocator_settings(os.environ)
        if cuda and not torch.cuda.is_available():
            raise BackendUnavailableError("torch has no CUDA device here; use --device cpu")
        if options.threads:
            torch.set_num_threads(int(options.threads))
        net = network_from_bundle(bundle)
        self.precision = options.precision or ("fp16" if cuda else "fp32")
        if self.precision not in ("fp32", "fp16"):
            raise BackendUnavailableError(f"the torch backend computes in fp32 or fp16, not {self.precision}")
        if self.precision == "fp16":
            if not cuda:
                raise BackendUnavailableError("fp16 convolutions need CUDA; on the CPU the torch backend uses fp32")
            net = half_with_fp32_norm(net)
        self._dev = torch.device(options.device)
        self.net = net.to(self._dev).eval()
        self._dtype = torch.float16 if self.precision == "fp16" else torch.float32
        self._graphs: dict[tuple, tuple] = {}
        self._cupy = None
        if cuda:
            self._cupy = import_cupy()
            share_torch_pool_and_stream(self._cupy, torch)
            torch.backends.cudnn.benchmark = True  # fixed patch shape: pick the fastest kernels once
        self.use_graphs = cuda and options.cuda_graphs

    @property
    def xp(self):
        return self._cupy if self._cupy is not None else np

    def __call__(self, batch):
        torch = self._torch
        with torch.inference_mode():
            if self._cupy is None:
                x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
                return self.net(x).float().numpy()
            x = torch.from_dlpack(batch)  # the CuPy array's memory, no copy
            out = self._replay(x) if self.use_graphs else self.net(x.to(self._dtype))
            return self._cupy.from_dlpack(out)

    def _replay(self, x):
        """The network as a CUDA graph for this input shape (captured on first use): the input is copied into
        the graph's static buffer (converted to the compute dtype on the way), the output copied out of it,
        so a returned array stays valid after the next call."""
        torch, key = self._torch, tuple(x.shape)
        if key not in self._graphs:
            self._graphs[key] = self._capture(key)
        graph, static_in, static_out = self._graphs[key]
        static_in.copy_(x)
        graph.replay()
        return static_out.to(torch.float32, copy=True)  # the copy out is the float32 conversion: one kernel

    def _capture(self, shape):
        torch = self._torch
        static_in = torch.zeros(shape, dtype=self._dtype, device=self._dev)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the graph: cuDNN picks its algorithms here
            for _ in range(2):
                self.net(static_in)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = self.net(static_in)
        log.debug("captured a CUDA graph of the network for input %s", shape)
        return graph, static_in, static_out

    def describe(self) -> str:
        if self._cupy is None:
            return "torch on cpu (fp32)"
        name = self._torch.cuda.get_device_name(self._dev)
        return f"torch on cuda ({name}, {self.precision}, InstanceNorm fp32{', CUDA graph' if self.use_graphs else ''})"

    def close(self) -> None:
        self._graphs.clear()
        self.net = None
