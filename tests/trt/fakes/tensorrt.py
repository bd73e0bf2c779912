"""Test double of the TensorRT Python API surface flare-rt uses, recording every call in ``CALLS``.

It behaves like TensorRT where flare-rt depends on it:
- the ONNX parser reads the real graph (names, shapes with -1 for symbolic dims, fp16/fp32 I/O);
- 10.x has ``BuilderFlag.FP16`` and a ``STRONGLY_TYPED`` creation flag; 11.x has no FP16 flag and a
  strongly typed network always (the flag is accepted); a weak-typing flag on a strongly typed network
  fails the build, as in TensorRT;
- a "plan" records the TensorRT version and GPU it was built on; deserialising it under another
  version or on another compute capability logs TensorRT's error and returns None;
- the execution context checks shapes against the profile, and ``execute_async_v3`` reads the input
  and writes the output through the device pointers it was given (host memory of the fake cupy,
  checked to be live), computing ``out[b, k] = in[b, 0] * (k + 1) + k``.

Configured by environment variables at import (FAKE_TRT_VERSION) and at call time (FAKE_GPU_CC,
FAKE_GPU_NAME, FAKE_TRT_FAIL=parse|build|context), so a subprocess with this folder on PYTHONPATH works too.
"""
from __future__ import annotations

import ctypes
import enum
import json
import os
import sys

import numpy as np

__version__ = os.environ.get("FAKE_TRT_VERSION", "10.16.1.11")
MAJOR = int(__version__.split(".")[0])
CALLS: list[tuple] = []
BUILDS: list[dict] = []


def _record(*call):
    CALLS.append(call)


class DataType(enum.Enum):
    FLOAT = 0
    HALF = 1


float32, float16 = DataType.FLOAT, DataType.HALF
_NP = {DataType.FLOAT: np.float32, DataType.HALF: np.float16}
_ONNX = {1: DataType.FLOAT, 10: DataType.HALF}


def nptype(t: DataType):
    return _NP[t]


class TensorIOMode(enum.Enum):
    INPUT = 1
    OUTPUT = 2


class MemoryPoolType(enum.Enum):
    WORKSPACE = 0


NetworkDefinitionCreationFlag = enum.IntEnum(
    "NetworkDefinitionCreationFlag",
    {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1} if MAJOR == 10 else {"STRONGLY_TYPED": 1})
BuilderFlag = enum.IntEnum("BuilderFlag", {"FP16": 0, "TF32": 7} if MAJOR == 10 else {"TF32": 7})


class ILogger:
    class Severity(enum.Enum):
        INTERNAL_ERROR = 0
        ERROR = 1
        WARNING = 2
        INFO = 3
        VERBOSE = 4

    def __init__(self):
        pass

    def log(self, severity, msg):  # overridden by users
        pass


class _Tensor:
    def __init__(self, name, shape, dtype):
        self.name, self.shape, self.dtype = name, tuple(shape), dtype


class INetworkDefinition:
    def __init__(self, flags):
        self.flags = flags
        self.inputs: list[_Tensor] = []
        self.outputs: list[_Tensor] = []

    @property
    def strongly_typed(self) -> bool:
        return MAJOR >= 11 or bool(self.flags & (1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED)))

    num_inputs = property(lambda self: len(self.inputs))
    num_outputs = property(lambda self: len(self.outputs))

    def get_input(self, i):
        return self.inputs[i]

    def get_output(self, i):
        return self.outputs[i]


class OnnxParser:
    def __init__(self, network, logger):
        self.network, self.logger, self.errors = network, logger, []

    def parse(self, data: bytes) -> bool:
        import onnx

        _record("parse", len(data))
        if os.environ.get("FAKE_TRT_FAIL") == "parse":
            self.errors.append("In node 3 (Conv): UNSUPPORTED_NODE: fake parser failure")
            return False
        model = onnx.load_from_string(data)
        types = {}
        for init in model.graph.initializer:
            types[init.name] = init.data_type
        self.graph_types = types

        def tensor(vi):
            dims = [d.dim_value if d.dim_value else -1 for d in vi.type.tensor_type.shape.dim]
            return _Tensor(vi.name, dims, _ONNX[vi.type.tensor_type.elem_type])

        self.network.inputs = [tensor(v) for v in model.graph.input]
        self.network.outputs = [tensor(v) for v in model.graph.output]
        self.network.instance_norms = sum(n.op_type == "InstanceNormalization" for n in model.graph.node)
        return True

    @property
    def num_errors(self):
        return len(self.errors)

    def get_error(self, i):
        return self.errors[i]


class ITimingCache:
    def __init__(self, data: bytes):
        self.entries = json.loads(data) if data else []

    def serialize(self) -> bytes:
        return json.dumps(self.entries).encode()


class IOptimizationProfile:
    def __init__(self):
        self.shapes = {}

    def set_shape(self, name, min, opt, max):
        _record("set_shape", name, tuple(min), tuple(opt), tuple(max))
        self.shapes[name] = (tuple(min), tuple(opt), tuple(max))


class IBuilderConfig:
    def __init__(self):
        self.flags, self.profiles, self.pools, self.timing_cache = set(), [], {}, None

    def set_flag(self, flag):
        _record("set_flag", flag)
        self.flags.add(flag)

    def set_memory_pool_limit(self, pool, size):
        _record("set_memory_pool_limit", pool, size)
        self.pools[pool] = size

    def create_timing_cache(self, data):
        _record("create_timing_cache", bytes(data))
        try:
            return ITimingCache(bytes(data))
        except ValueError:
            return None

    def set_timing_cache(self, cache, ignore_mismatch):
        _record("set_timing_cache", ignore_mismatch)
        self.timing_cache = cache
        return True

    def add_optimization_profile(self, profile):
        self.profiles.append(profile)
        return len(self.profiles) - 1


def _gpu():
    return os.environ.get("FAKE_GPU_NAME", "Quadro RTX 5000"), os.environ.get("FAKE_GPU_CC", "7.5")


class Builder:
    def __init__(self, logger):
        self.logger = logger

    def create_network(self, flags=0):
        _record("create_network", flags)
        return INetworkDefinition(flags)

    def create_builder_config(self):
        return IBuilderConfig()

    def create_optimization_profile(self):
        return IOptimizationProfile()

    def build_serialized_network(self, network, config):
        _record("build_serialized_network")
        error = None
        if os.environ.get("FAKE_TRT_FAIL") == "build":
            error = "Error Code 10: Internal Error (Could not find any implementation for node Conv_3.)"
        elif network.strongly_typed and MAJOR == 10 and BuilderFlag.FP16 in config.flags:
            error = "Error Code 3: API Usage Error (BuilderFlag::kFP16 is not allowed with a strongly typed network)"
        elif len(config.profiles) != 1 or any(d == -1 for d in network.inputs[0].shape[1:]):
            error = "Error Code 4: Network has dynamic or shape inputs, but no optimization profile has been defined."
        if error:
            self.logger.log(ILogger.Severity.ERROR, error)
            return None
        inp, out = network.inputs[0], network.outputs[0]
        lo, opt, hi = config.profiles[0].shapes[inp.name]
        gpu_name, cc = _gpu()
        plan = {"fake_trt_plan": 1, "tensorrt": __version__, "cc": cc, "gpu": gpu_name,
                "strongly_typed": network.strongly_typed, "flags": sorted(int(f) for f in config.flags),
                "input": [inp.name, list(inp.shape), inp.dtype.name], "output": [out.name, list(out.shape), out.dtype.name],
                "profile": [list(lo), list(opt), list(hi)]}
        config.timing_cache.entries.append(f"{gpu_name}:{len(BUILDS)}")
        BUILDS.append(plan)
        return json.dumps(plan).encode()


class Runtime:
    def __init__(self, logger):
        self.logger = logger

    def deserialize_cuda_engine(self, data):
        _record("deserialize_cuda_engine", len(data))
        try:
            plan = json.loads(bytes(data))
            assert plan["fake_trt_plan"] == 1
        except (ValueError, KeyError, AssertionError):
            self.logger.log(ILogger.Severity.ERROR, "IRuntime::deserializeCudaEngine: Error Code 1: Serialization "
                            "(Serialization assertion plan->header.magicTag == rt::kPLAN_MAGIC_TAG failed.)")
            return None
        if plan["tensorrt"] != __version__:
            self.logger.log(ILogger.Severity.ERROR, "IRuntime::deserializeCudaEngine: Error Code 1: Serialization "
                            f"(Version tag does not match. Current Version: {__version__}, Serialized Engine "
                            f"Version: {plan['tensorrt']})")
            return None
        if plan["cc"] != _gpu()[1]:
            self.logger.log(ILogger.Severity.ERROR, "The engine plan file is generated on an incompatible device, "
                            f"expecting compute {_gpu()[1]} got compute {plan['cc']}, please rebuild.")
            return None
        return ICudaEngine(plan, self.logger)


class ICudaEngine:
    def __init__(self, plan, logger):
        self.plan, self.logger = plan, logger
        self.num_io_tensors = 2

    def _io(self, name):
        for key in ("input", "output"):
            if self.plan[key][0] == name:
                return key, self.plan[key]
        raise KeyError(name)

    def get_tensor_name(self, i):
        return self.plan[("input", "output")[i]][0]

    def get_tensor_mode(self, name):
        return TensorIOMode.INPUT if self._io(name)[0] == "input" else TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name):
        return DataType[self._io(name)[1][2]]

    def get_tensor_profile_shape(self, name, profile_index):
        assert self._io(name)[0] == "input" and profile_index == 0
        return [tuple(s) for s in self.plan["profile"]]

    def create_execution_context(self):
        _record("create_execution_context")
        if os.environ.get("FAKE_TRT_FAIL") == "context":
            self.logger.log(ILogger.Severity.ERROR, "Error Code 2: OutOfMemory (Requested size was 4096 bytes.)")
            return None
        return IExecutionContext(self)


class IExecutionContext:
    def __init__(self, engine):
        self.engine, self.shape, self.addresses = engine, None, {}

    def set_input_shape(self, name, shape):
        shape = tuple(int(d) for d in shape)
        _record("set_input_shape", name, shape)
        lo, _, hi = self.engine.plan["profile"]
        if len(shape) != len(lo) or any(not a <= s <= b for a, s, b in zip(lo, shape, hi)):
            self.engine.logger.log(ILogger.Severity.ERROR, f"setInputShape: shape {shape} is outside the profile "
                                   f"[{lo}, {hi}]")
            return False
        self.shape = shape
        return True

    def get_tensor_shape(self, name):
        if self.engine._io(name)[0] == "input":
            return self.shape
        k = self.engine.plan["output"][1][1]
        return (self.shape[0], k, *self.shape[2:])

    def set_tensor_address(self, name, ptr):
        _record("set_tensor_address", name, int(ptr))
        self.addresses[name] = int(ptr)
        return True

    def execute_async_v3(self, stream_handle):
        _record("execute_async_v3", int(stream_handle))
        plan = self.engine.plan
        (iname, _, idt), (oname, _, odt) = plan["input"], plan["output"]
        if self.shape is None or iname not in self.addresses or oname not in self.addresses:
            self.engine.logger.log(ILogger.Severity.ERROR, "enqueueV3: input shape or tensor address not set")
            return False
        x = self._view(self.addresses[iname], self.shape, _NP[DataType[idt]])
        y = self._view(self.addresses[oname], self.get_tensor_shape(oname), _NP[DataType[odt]])
        k = np.arange(y.shape[1], dtype=np.float32).reshape(1, -1, *([1] * (y.ndim - 2)))
        y[...] = (x[:, :1].astype(np.float32) * (k + 1) + k).astype(y.dtype)
        return True

    @staticmethod
    def _view(ptr, shape, dtype):
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        sys.modules["cupy"].find_allocation(ptr, nbytes)
        return np.frombuffer((ctypes.c_byte * nbytes).from_address(ptr), dtype=dtype).reshape(shape)
