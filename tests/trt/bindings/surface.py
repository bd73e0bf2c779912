"""Run by ``tests/trt/test_trt_bindings.py`` in a subprocess where NVIDIA's real TensorRT Python bindings
(``tensorrt_bindings``) import over the stub libraries of ``stub_nvinfer.c``. Prints one JSON object: the
real API of the classes and enums the TensorRT double mirrors, and what flare-rt's own TensorRT code does
with the real module. Usage: ``python surface.py`` (the bindings importable, the stubs on LD_LIBRARY_PATH).
"""
from __future__ import annotations

import json
import re
import sys

import numpy as np
import tensorrt_bindings

# NVIDIA's ``tensorrt`` package (the frontend sdist) is ``from tensorrt_bindings import *`` plus __version__
sys.modules["tensorrt"] = tensorrt_bindings

CLASSES = ("Builder", "OnnxParser", "INetworkDefinition", "ITensor", "IBuilderConfig", "IOptimizationProfile",
           "ITimingCache", "Runtime", "ICudaEngine", "IExecutionContext", "ILogger")
ENUMS = ("DataType", "TensorIOMode", "MemoryPoolType", "NetworkDefinitionCreationFlag", "BuilderFlag",
         "ILogger.Severity")
OPEN, CLOSE = "([{<", ")]}>"


def split_top(text: str) -> list[str]:
    """``text`` split at the commas outside brackets (types and defaults hold commas: ``dict[str, int]``,
    ``<Enum.X: 0>``)."""
    parts, depth, cur = [], 0, []
    for ch in text:
        depth += (ch in OPEN) - (ch in CLOSE)
        if ch == "," and depth == 0:
            parts.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    if "".join(cur).strip():
        parts.append("".join(cur).strip())
    return parts


def signatures(name: str, doc: str) -> list[dict]:
    """The overloads a pybind11 docstring lists: each ``{"params": [[name, has_default, declared type], ...],
    "returns": str}`` without ``self``."""
    found = []
    for line in doc.splitlines():
        m = re.match(rf"^\s*(?:\d+\.\s+)?{re.escape(name)}\((.*)\)(?:\s*->\s*(.+))?$", line.strip())
        if not m or m.group(1) == "*args, **kwargs":
            continue
        params = []
        for part in split_top(m.group(1)):
            head, colon, annotation = part.partition(":")
            pname = head.split("=", 1)[0].strip()
            if pname in ("self", "/", "*"):
                continue
            has_default = "=" in (annotation if colon else head)
            params.append([pname.lstrip("*"), has_default, annotation.split("=", 1)[0].strip()])
        found.append({"params": params, "returns": (m.group(2) or "").strip()})
    return found


def member(cls, name: str) -> dict:
    for klass in cls.__mro__:
        if name in vars(klass):
            attr = vars(klass)[name]
            if isinstance(attr, property):
                return {"kind": "property", "settable": attr.fset is not None}
            return {"kind": "method", "overloads": signatures(name, getattr(attr, "__doc__", None) or "")}
    return {"kind": "missing"}


def resolve(dotted: str):
    obj = tensorrt_bindings
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def api() -> dict:
    classes = {}
    for name in CLASSES:
        cls = resolve(name)
        names = {n for n in dir(cls) if not n.startswith("_")} | {"__init__"}
        classes[name] = {n: member(cls, n) for n in sorted(names)}
    enums = {name: {k: int(v) for k, v in resolve(name).__members__.items()} for name in ENUMS}
    module = {n: callable(getattr(tensorrt_bindings, n, None)) for n in ("nptype", "Builder", "Runtime", "OnnxParser")}
    module["float32"] = str(getattr(tensorrt_bindings, "float32", None))
    module["float16"] = str(getattr(tensorrt_bindings, "float16", None))
    return {"version": tensorrt_bindings.__version__, "classes": classes, "enums": enums, "module": module}


def outcome(call) -> list:
    try:
        call()
    except Exception as exc:  # what the caller sees: the exception's type and its one line
        return [type(exc).__name__, str(exc)]
    return ["ok", ""]


def raw_bindings() -> dict:
    """The real bindings alone: what making a runtime and a builder raises over the stubs, and what TensorRT's
    C code sent to a Python ILogger meanwhile (through the bindings' trampoline)."""
    trt = tensorrt_bindings

    class Recorder(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.messages = []

        def log(self, severity, msg):
            self.messages.append([severity.name, msg])

    recorder = Recorder()
    made = {"runtime": outcome(lambda: trt.Runtime(recorder)), "builder": outcome(lambda: trt.Builder(recorder))}
    return {**made, "messages": recorder.messages}


def declared_types(dotted: str) -> list[dict]:
    """Each overload of a method as {parameter: declared type} (from :func:`signatures`)."""
    overloads = signatures(dotted.rsplit(".", 1)[-1], resolve(dotted).__doc__ or "")
    return [{pname: annotation for pname, _, annotation in o["params"]} for o in overloads]


def tuples_as_dims() -> dict:
    """Whether a tuple of ints is taken where the bindings declare ``Dims`` (flare-rt passes tuples to
    ``set_shape`` and ``set_input_shape``). pybind11 applies a registered implicit conversion to every
    parameter of that type; the one such parameter reachable without a GPU is ``Dims.__setitem__(slice,
    Dims)``."""
    trt = tensorrt_bindings
    probes = {}
    for label, value in (("tuple", (7, 8)), ("list", [7, 8]), ("numpy ints", (np.int64(7), np.int32(8))),
                         ("floats", (7.0, 8.0))):
        dims = trt.Dims((1, 2, 3))
        probes[label] = [*outcome(lambda dims=dims, value=value: dims.__setitem__(slice(0, 2), value)), list(dims)]
    declared = {m: declared_types(m) for m in ("IOptimizationProfile.set_shape", "IExecutionContext.set_input_shape",
                                               "Dims.__setitem__")}
    return {"probes": probes, "declared": declared}


def flare_rt_on_real_module() -> dict:
    """flare-rt's TensorRT code with the real module: every TensorRT object it creates fails to be made (the
    stubs), so this reaches as far as a machine without TensorRT's libraries allows."""
    from flare_rt.trt.build import EngineConfig, _network_flags, build_engine
    from flare_rt.trt.runner import EngineRunner
    from flare_rt.trt.runtime import load_tensorrt, make_logger

    trt = load_tensorrt()
    logger = make_logger(trt)
    sev = trt.ILogger.Severity
    reported = []
    for level in ("VERBOSE", "INFO", "WARNING", "ERROR"):
        logger.log(getattr(sev, level), f"a {level} message")
        reported.append(logger.last_error())
    return {
        "loaded": trt.__version__,
        "is_ilogger": isinstance(logger, trt.ILogger),
        "last_error": reported,  # after each message in turn
        "network_flags": _network_flags(trt),
        "nptype": {n: np.dtype(trt.nptype(getattr(trt.DataType, n))).name for n in ("FLOAT", "HALF")},
        "runner": outcome(lambda: EngineRunner(b"plan", trt, None, make_logger(trt), where="x.engine")),
        "build": outcome(lambda: build_engine(b"onnx", "image", EngineConfig(), trt, make_logger(trt))),
    }


if __name__ == "__main__":
    json.dump({"api": api(), "raw": raw_bindings(), "dims": tuples_as_dims(), "flare_rt": flare_rt_on_real_module()},
              sys.stdout)
