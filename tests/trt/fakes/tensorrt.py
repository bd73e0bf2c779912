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
FAKE_GPU_NAME, FAKE_TRT_FAIL=parse|build|context|cuda_init), so a subprocess with this folder on PYTHONPATH
works too.

It offers only what NVIDIA's bindings have, under their names: classes, methods with their parameter names,
properties and enum members with their values, for 10.16 and 11.4 (``tests/trt/test_trt_bindings.py``
checks it against the real bindings). Its own state is private (underscored).
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


class DataType(enum.IntEnum):
    FLOAT = 0
    HALF = 1


float32, float16 = DataType.FLOAT, DataType.HALF
_NP = {DataType.FLOAT: np.float32, DataType.HALF: np.float16}
_ONNX = {1: DataType.FLOAT, 10: DataType.HALF}


def nptype(trt_type: DataType):
    return _NP[trt_type]


class TensorIOMode(enum.IntEnum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class MemoryPoolType(enum.IntEnum):
    WORKSPACE = 0


# TensorRT 11 dropped EXPLICIT_BATCH (always explicit) and renumbered: STRONGLY_TYPED is 0 there, 1 in 10.x
NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag",
                                             {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1} if MAJOR == 10
                                             else {"STRONGLY_TYPED": 0})
BuilderFlag = enum.IntEnum("BuilderFlag", {"FP16": 0, "TF32": 6} if MAJOR == 10 else {"TF32": 6})
_NULLPTR = "pybind11::init(): factory function returned nullptr"  # what the bindings raise when TensorRT returns none


class ILogger:
    class Severity(enum.IntEnum):
        INTERNAL_ERROR = 0
        ERROR = 1
        WARNING = 2
        INFO = 3
        VERBOSE = 4

    def __init__(self):
        pass

    def log(self, severity, msg):  # overridden by users
        pass


def _cuda_init(logger) -> None:
    """TensorRT that cannot start CUDA (a driver older than its CUDA, no visible GPU): it logs a warning and
    returns no object, which the bindings raise as a TypeError."""
    if os.environ.get("FAKE_TRT_FAIL") == "cuda_init":
        logger.log(ILogger.Severity.WARNING, "CUDA initialization failure with error: 35. Please check your CUDA "
                   "installation: http://docs.nvidia.com/cuda/cuda-installation-guide-linux/index.html")
        raise TypeError(_NULLPTR)


def _dims(value) -> tuple[int, ...]:
    """What the bindings take where they declare ``Dims``: a Dims, or a tuple or list of ints (numpy ints
    too), by pybind11's implicit conversion; anything else (floats) is a TypeError."""
    items = tuple(value) if isinstance(value, (tuple, list)) else None
    if items is None or not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) for d in items):
        raise TypeError(f"incompatible function arguments: Dims expected, got {value!r}")
    return tuple(int(d) for d in items)


class ITensor:
    def __init__(self, name, shape, dtype):
        self._name, self._shape, self._dtype = name, tuple(shape), dtype

    name = property(lambda self: self._name)
    shape = property(lambda self: self._shape)
    dtype = property(lambda self: self._dtype)


class INetworkDefinition:
    def __init__(self, flags):
        self._flags = flags
        self._inputs: list[ITensor] = []
        self._outputs: list[ITensor] = []

    @property
    def _strongly_typed(self) -> bool:
        return MAJOR >= 11 or bool(self._flags & (1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED)))

    num_inputs = property(lambda self: len(self._inputs))
    num_outputs = property(lambda self: len(self._outputs))

    def get_input(self, index):
        return self._inputs[index]

    def get_output(self, index):
        return self._outputs[index]


class OnnxParser:
    def __init__(self, network, logger):
        self._network, self._logger, self._errors = network, logger, []

    def parse(self, model, path=None):
        import onnx

        _record("parse", len(model))
        if os.environ.get("FAKE_TRT_FAIL") == "parse":
            self._errors.append("In node 3 (Conv): UNSUPPORTED_NODE: fake parser failure")
            return False
        graph = onnx.load_from_string(model).graph

        def tensor(vi):
            dims = [d.dim_value if d.dim_value else -1 for d in vi.type.tensor_type.shape.dim]
            return ITensor(vi.name, dims, _ONNX[vi.type.tensor_type.elem_type])

        self._network._inputs = [tensor(v) for v in graph.input]
        self._network._outputs = [tensor(v) for v in graph.output]
        return True

    @property
    def num_errors(self):
        return len(self._errors)

    def get_error(self, index):
        return self._errors[index]


class ITimingCache:
    def __init__(self, data: bytes):
        self._entries = json.loads(data) if data else []

    def serialize(self) -> bytes:
        return json.dumps(self._entries).encode()


class IOptimizationProfile:
    def __init__(self):
        self._shapes = {}

    def set_shape(self, input, min, opt, max):
        min, opt, max = _dims(min), _dims(opt), _dims(max)
        _record("set_shape", input, min, opt, max)
        self._shapes[input] = (min, opt, max)


class IBuilderConfig:
    def __init__(self):
        self._flags, self._profiles, self._pools, self._timing_cache = set(), [], {}, None

    def set_flag(self, flag):
        _record("set_flag", flag)
        self._flags.add(flag)

    def set_memory_pool_limit(self, pool, pool_size):
        _record("set_memory_pool_limit", pool, pool_size)
        self._pools[pool] = pool_size

    def create_timing_cache(self, serialized_timing_cache):
        _record("create_timing_cache", bytes(serialized_timing_cache))
        try:
            return ITimingCache(bytes(serialized_timing_cache))
        except ValueError:
            return None

    def set_timing_cache(self, cache, ignore_mismatch):
        _record("set_timing_cache", ignore_mismatch)
        self._timing_cache = cache
        return True

    def add_optimization_profile(self, profile):
        self._profiles.append(profile)
        return len(self._profiles) - 1


def _gpu():
    return os.environ.get("FAKE_GPU_NAME", "Quadro RTX 5000"), os.environ.get("FAKE_GPU_CC", "7.5")


class Builder:
    def __init__(self, logger):
        _cuda_init(logger)
        self._logger = logger

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
        elif network._strongly_typed and MAJOR == 10 and BuilderFlag.FP16 in config._flags:
            error = "Error Code 3: API Usage Error (BuilderFlag::kFP16 is not allowed with a strongly typed network)"
        elif len(config._profiles) != 1 or any(d == -1 for d in network._inputs[0].shape[1:]):
            error = "Error Code 4: Network has dynamic or shape inputs, but no optimization profile has been defined."
        if error:
            self._logger.log(ILogger.Severity.ERROR, error)
            return None
        inp, out = network._inputs[0], network._outputs[0]
        lo, opt, hi = config._profiles[0]._shapes[inp.name]
        gpu_name, cc = _gpu()
        plan = {"fake_trt_plan": 1, "tensorrt": __version__, "cc": cc, "gpu": gpu_name,
                "strongly_typed": network._strongly_typed, "flags": sorted(int(f) for f in config._flags),
                "input": [inp.name, list(inp.shape), inp.dtype.name],
                "output": [out.name, list(out.shape), out.dtype.name],
                "profile": [list(lo), list(opt), list(hi)]}
        config._timing_cache._entries.append(f"{gpu_name}:{len(BUILDS)}")
        BUILDS.append(plan)
        return json.dumps(plan).encode()


class Runtime:
    def __init__(self, logger):
        _cuda_init(logger)
        self._logger = logger

    def deserialize_cuda_engine(self, serialized_engine):
        _record("deserialize_cuda_engine", len(serialized_engine))
        try:
            plan = json.loads(bytes(serialized_engine))
            assert plan["fake_trt_plan"] == 1
        except (ValueError, KeyError, AssertionError):
            self._logger.log(ILogger.Severity.ERROR, "IRuntime::deserializeCudaEngine: Error Code 1: Serialization "
                             "(Serialization assertion plan->header.magicTag == rt::kPLAN_MAGIC_TAG failed.)")
            return None
        if plan["tensorrt"] != __version__:
            self._logger.log(ILogger.Severity.ERROR, "IRuntime::deserializeCudaEngine: Error Code 1: Serialization "
                             f"(Version tag does not match. Current Version: {__version__}, Serialized Engine "
                             f"Version: {plan['tensorrt']})")
            return None
        if plan["cc"] != _gpu()[1]:
            self._logger.log(ILogger.Severity.ERROR, "The engine plan file is generated on an incompatible device, "
                             f"expecting compute {_gpu()[1]} got compute {plan['cc']}, please rebuild.")
            return None
        return ICudaEngine(plan, self._logger)


class ICudaEngine:
    def __init__(self, plan, logger):
        self._plan, self._logger = plan, logger

    num_io_tensors = property(lambda self: 2)

    def _io(self, name):
        for key in ("input", "output"):
            if self._plan[key][0] == name:
                return key, self._plan[key]
        raise KeyError(name)

    def get_tensor_name(self, index):
        return self._plan[("input", "output")[index]][0]

    def get_tensor_mode(self, name):
        return TensorIOMode.INPUT if self._io(name)[0] == "input" else TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name):
        return DataType[self._io(name)[1][2]]

    def get_tensor_profile_shape(self, name, profile_index):
        assert self._io(name)[0] == "input" and profile_index == 0
        return [tuple(s) for s in self._plan["profile"]]

    def create_execution_context(self, strategy=None):
        _record("create_execution_context")
        if os.environ.get("FAKE_TRT_FAIL") == "context":
            self._logger.log(ILogger.Severity.ERROR, "Error Code 2: OutOfMemory (Requested size was 4096 bytes.)")
            return None
        return IExecutionContext(self)


class IExecutionContext:
    def __init__(self, engine):
        self._engine, self._shape, self._addresses = engine, None, {}

    def set_input_shape(self, name, shape):
        shape = _dims(shape)
        _record("set_input_shape", name, shape)
        lo, _, hi = self._engine._plan["profile"]
        if len(shape) != len(lo) or any(not a <= s <= b for a, s, b in zip(lo, shape, hi)):
            self._engine._logger.log(ILogger.Severity.ERROR, f"setInputShape: shape {shape} is outside the profile "
                                     f"[{lo}, {hi}]")
            return False
        self._shape = shape
        return True

    def get_tensor_shape(self, name):
        if self._engine._io(name)[0] == "input":
            return self._shape
        k = self._engine._plan["output"][1][1]
        return (self._shape[0], k, *self._shape[2:])

    def set_tensor_address(self, name, memory):
        _record("set_tensor_address", name, int(memory))
        self._addresses[name] = int(memory)
        return True

    def execute_async_v3(self, stream_handle):
        _record("execute_async_v3", int(stream_handle))
        plan = self._engine._plan
        (iname, _, idt), (oname, _, odt) = plan["input"], plan["output"]
        if self._shape is None or iname not in self._addresses or oname not in self._addresses:
            self._engine._logger.log(ILogger.Severity.ERROR, "enqueueV3: input shape or tensor address not set")
            return False
        x = self._view(self._addresses[iname], self._shape, _NP[DataType[idt]])
        y = self._view(self._addresses[oname], self.get_tensor_shape(oname), _NP[DataType[odt]])
        k = np.arange(y.shape[1], dtype=np.float32).reshape(1, -1, *([1] * (y.ndim - 2)))
        y[...] = (x[:, :1].astype(np.float32) * (k + 1) + k).astype(y.dtype)
        return True

    @staticmethod
    def _view(ptr, shape, dtype):
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        sys.modules["cupy"].find_allocation(ptr, nbytes)
        return np.frombuffer((ctypes.c_byte * nbytes).from_address(ptr), dtype=dtype).reshape(shape)
