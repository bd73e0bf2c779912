"""Where the TensorRT and CuPy test doubles live, and how a test installs one (imported by the tests
of this folder as ``trt_doubles``: a name no other conftest or helper of the suite uses)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

FAKES = Path(__file__).with_name("fakes")  # put on PYTHONPATH, a subprocess imports the doubles as tensorrt/cupy
TRT10, TRT11 = "10.16.1.11", "11.4.0.106"


def load_fake(name: str, monkeypatch):
    """A fresh copy of ``fakes/<name>.py`` as ``sys.modules[name]`` for the current test only."""
    spec = importlib.util.spec_from_file_location(name, FAKES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module
