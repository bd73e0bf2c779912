"""flare-rt's TensorRT code and its TensorRT double against NVIDIA's real TensorRT Python bindings.

TensorRT's libraries cannot be installed here (only NVIDIA's index serves them), but its Python bindings
are a PyPI wheel (``tensorrt-cu12-bindings``, pinned in the dev extra at the challenge image's version).
Over stub libraries (``bindings/stub_nvinfer.c``: TensorRT's C entry points, each failing as TensorRT does
when CUDA cannot start) the real bindings import, and these tests show:

- the double offers only what the real API has: every class, method (with its parameter names and
  defaults), property and enum member (with its value) of the double exists in the real bindings of the
  same version, and the version-specific ones (``BuilderFlag.FP16``, ``EXPLICIT_BATCH``) exactly where the
  real version has them; the methods whose result flare-rt tests for success return ``bool``;
- flare-rt's own code runs on the real module: its logger subclasses the real ``ILogger`` and receives a
  message sent from C through the real trampoline, the strongly typed flag and numpy types come out right,
  the tuples it passes where TensorRT declares ``Dims`` are converted (floats refused, in the double too),
  and a TensorRT that cannot start is one line (the double fails the same way, with the same exception).

No engine is built or run here: that waits for a GPU with TensorRT (``test_trt_gpu.py``). Other versions:
``$FLARE_RT_TRT_BINDINGS`` (see ``trt_bindings.py``).
"""
from __future__ import annotations

import ast
import enum
import inspect
import re
import tomllib
from pathlib import Path

import numpy as np
import pytest
from trt_bindings import BINDINGS_ENV, build_stubs, extra_sites, installed_site, surface
from trt_doubles import FAKES, TRT10, TRT11, load_fake

REPO = Path(__file__).resolve().parents[2]
SITES = [installed_site(), *extra_sites()]
#: (class, method) whose result flare-rt tests as success (a falsy result is an error it reports)
BOOL_RESULTS = {("OnnxParser", "parse"), ("IBuilderConfig", "set_timing_cache"),
                ("IExecutionContext", "set_input_shape"), ("IExecutionContext", "set_tensor_address"),
                ("IExecutionContext", "execute_async_v3")}


@pytest.fixture(scope="module")
def stubs(tmp_path_factory):
    return build_stubs(tmp_path_factory.mktemp("trt-stubs"))


@pytest.fixture(scope="module", params=range(len(SITES)),
                ids=["installed", *(f"{BINDINGS_ENV}:{p.name}" for p in SITES[1:])])
def real(request, stubs):
    site = SITES[request.param]
    assert site is not None, ("NVIDIA's TensorRT bindings are not installed: pip install -e '.[dev]' (it brings "
                              "tensorrt-cu12-bindings)")
    return surface(site, stubs)


@pytest.fixture
def fake(real, monkeypatch):
    """The double as it presents itself for the real bindings' version."""
    monkeypatch.setenv("FAKE_TRT_VERSION", real["api"]["version"])
    return load_fake("tensorrt", monkeypatch)


def params(func) -> list[tuple[str, bool]]:
    sig = inspect.signature(func)
    return [(p.name, p.default is not p.empty) for p in list(sig.parameters.values())[1:]]


def fits(mine: list[tuple[str, bool]], overloads: list[dict]) -> bool:
    """Some real overload takes ``mine``'s parameters, by the same names in the same order, has a default
    wherever the double has one, and needs nothing more."""
    for o in overloads:
        theirs = [tuple(p) for p in o["params"]]
        if len(theirs) >= len(mine) and all(t[0] == m[0] and (t[1] or not m[1]) for m, t in zip(mine, theirs)) \
                and all(d for _, d in theirs[len(mine):]):
            return True
    return False


def test_the_installed_bindings_are_the_image_s_tensorrt():
    """The dev extra's bindings, the challenge image's TensorRT and the double's 10.x are one version."""
    site = installed_site()
    assert site is not None, "pip install -e '.[dev]' (it brings tensorrt-cu12-bindings)"
    dev = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]
    (pin,) = [re.sub(r"\s", "", r) for r in dev if r.startswith("tensorrt-cu12-bindings")]
    image = re.search(r"^tensorrt-cu12-bindings==(\S+)", (REPO / "docker/constraints/tensorrt.txt").read_text(), re.M)
    assert pin.split(";")[0] == f"tensorrt-cu12-bindings=={image.group(1)}" and image.group(1) == TRT10
    (dist,) = site.glob("tensorrt_cu12_bindings-*.dist-info")
    assert dist.name == f"tensorrt_cu12_bindings-{TRT10}.dist-info"


def test_each_major_the_double_models_is_checked_against_its_real_bindings():
    """The double models 10.x and 11.x; a run that sees only the dev extra's 10.x bindings checks half of it, so it
    fails, as a missing dev extra does (the bindings download from PyPI: nothing a CPU machine cannot have)."""
    dists = [d for site in SITES if site for d in site.glob("tensorrt_cu*_bindings-*.dist-info")]
    found = {d.name.removesuffix(".dist-info").split("-")[1] for d in dists}
    missing = sorted({TRT10, TRT11} - found)
    assert not missing, (f"no bindings of {', '.join(missing)} to check the double against (found {sorted(found)}): "
                         f"export {BINDINGS_ENV}=$(python tests/trt/trt_bindings.py .venv/trt-bindings)")


def test_the_real_bindings_are_a_version_the_double_models(real):
    assert real["api"]["version"] in (TRT10, TRT11), (f"the double models TensorRT {TRT10} and {TRT11}; "
                                                      f"got {real['api']['version']}")
    assert real["flare_rt"]["loaded"] == real["api"]["version"]  # flare-rt's load_tensorrt accepts it


def test_the_double_offers_only_the_real_classes_methods_and_properties(real, fake):
    api, problems, checked = real["api"]["classes"], [], 0
    for cname, members in api.items():
        cls = getattr(fake, cname, None)
        if cls is None:
            continue
        for name, attr in vars(cls).items():
            if isinstance(attr, type) or (name.startswith("_") and name != "__init__"):
                continue
            got = members.get(name, {"kind": "missing"})
            if name == "__init__" and not got.get("overloads"):
                continue  # not constructible from Python: the double's constructor is its own business
            checked += 1
            kind = "property" if isinstance(attr, property) else "method"
            if got["kind"] != kind:
                problems.append(f"{cname}.{name}: a {kind} in the double, {got['kind']} in TensorRT")
            elif kind == "method" and not fits(params(attr), got["overloads"]):
                theirs = [o["params"] for o in got["overloads"]]
                problems.append(f"{cname}.{name}{params(attr)}: TensorRT's are {theirs}")
            elif (cname, name) in BOOL_RESULTS and {o["returns"] for o in got["overloads"]} != {"bool"}:
                problems.append(f"{cname}.{name}: returns {[o['returns'] for o in got['overloads']]}, not bool")
    assert not problems, "the TensorRT double differs from the real bindings:\n" + "\n".join(problems)
    assert checked >= 30  # the classes matched: a renamed class would silently check nothing
    assert {c for c in api if getattr(fake, c, None) is not None} == set(api)


def _enum(module, dotted: str):
    obj = module
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def test_the_double_s_enums_are_the_real_members_and_values(real, fake, monkeypatch):
    universe = {}
    for version in (TRT10, TRT11):  # every member the double has in either version
        monkeypatch.setenv("FAKE_TRT_VERSION", version)
        other = load_fake("tensorrt", monkeypatch)
        for name in real["api"]["enums"]:
            universe.setdefault(name, set()).update(_enum(other, name).__members__)
    monkeypatch.setenv("FAKE_TRT_VERSION", real["api"]["version"])
    for name, members in real["api"]["enums"].items():
        mine = _enum(fake, name)
        assert issubclass(mine, enum.Enum)
        assert {k: int(v.value) for k, v in mine.__members__.items()} == \
            {k: v for k, v in members.items() if k in universe[name]}, name
    assert ("FP16" in real["api"]["enums"]["BuilderFlag"]) == real["api"]["version"].startswith("10.")


def test_the_double_s_module_functions_are_real(real, fake):
    module = real["api"]["module"]
    assert module["nptype"] and module["Builder"] and module["Runtime"] and module["OnnxParser"]
    assert (module["float32"], module["float16"]) == ("DataType.FLOAT", "DataType.HALF")
    assert (fake.float32, fake.float16) == (fake.DataType.FLOAT, fake.DataType.HALF)


def test_the_double_keeps_its_own_state_private():
    """Public names on the double's objects are TensorRT's: its own state is underscored, so flare-rt cannot
    come to depend on an attribute TensorRT does not have."""
    tree = ast.parse((FAKES / "tensorrt.py").read_text())
    public = [f"line {node.lineno}: self.{t.attr}" for node in ast.walk(tree) if isinstance(node, ast.Assign)
              for target in node.targets for t in (target.elts if isinstance(target, ast.Tuple) else [target])
              if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self"
              and not t.attr.startswith("_")]
    assert not public, public


def test_tensorrt_s_messages_reach_a_python_logger(real):
    """TensorRT's C code calls ILogger::log; the real bindings' trampoline brings it to Python (the stubs send
    what TensorRT sends when CUDA cannot start, as a warning)."""
    stub = ["WARNING", "CUDA initialization failure with error: 35. Please check your CUDA installation (stub "
            "libnvinfer of the flare-rt tests: no TensorRT libraries here)"]
    assert real["raw"]["messages"] == [stub, stub]  # one from the runtime, one from the builder


def test_flare_rt_runs_on_the_real_module(real):
    run, enums = real["flare_rt"], real["api"]["enums"]
    assert run["is_ilogger"]
    # after VERBOSE, INFO, WARNING and ERROR in turn: only warnings and errors are kept, errors first
    assert run["last_error"] == ["no message from TensorRT", "no message from TensorRT", "warning: a WARNING message",
                                 "a ERROR message"]
    assert run["network_flags"] == 1 << enums["NetworkDefinitionCreationFlag"]["STRONGLY_TYPED"]
    assert run["nptype"] == {"FLOAT": "float32", "HALF": "float16"}


def test_tuples_of_ints_are_taken_where_tensorrt_declares_dims(real, fake):
    """flare-rt passes tuples to set_shape (declared Dims) and set_input_shape: the real bindings convert a tuple
    or list of ints (numpy ints too) to Dims implicitly, as shown on the one Dims parameter a machine without a
    GPU can reach, and refuse floats; the double takes and refuses the same."""
    declared, probes = real["dims"]["declared"], real["dims"]["probes"]
    dims = next(t for t in declared["Dims.__setitem__"][-1].values() if t.endswith(".Dims"))
    assert declared["IOptimizationProfile.set_shape"] == [{"input": "str", "min": dims, "opt": dims, "max": dims}]
    assert {"name": "str", "shape": dims} in declared["IExecutionContext.set_input_shape"]
    assert declared["Dims.__setitem__"][-1] == {"arg0": "slice", "arg1": dims}
    taken = {"tuple": (7, 8), "list": [7, 8], "numpy ints": (np.int64(7), np.int32(8))}
    for label, value in taken.items():
        assert probes[label] == ["ok", "", [7, 8, 3]], (label, probes[label])
        fake.IOptimizationProfile().set_shape("image", value, value, value)
    kind, line, after = probes["floats"]
    assert kind == "TypeError" and "incompatible function arguments" in line and after == [1, 2, 3]
    with pytest.raises(TypeError, match="incompatible function arguments"):
        fake.IOptimizationProfile().set_shape("image", (7.0, 8.0), (7, 8), (7, 8))


def test_a_tensorrt_that_cannot_start_is_one_line_not_pybind11_s_typeerror(real, fake):
    nullptr = ["TypeError", "pybind11::init(): factory function returned nullptr"]
    assert (real["raw"]["runtime"], real["raw"]["builder"]) == (nullptr, nullptr)
    for what, key in (("runtime", "runner"), ("builder", "build")):
        kind, line = real["flare_rt"][key]
        assert kind == "BackendUnavailableError" and "\n" not in line, (kind, line)
        assert line.startswith(f"TensorRT could not create its {what} (warning: CUDA initialization failure with "
                               "error: 35.") and "driver supports TensorRT's CUDA" in line
    # the double fails the same way
    assert fake._NULLPTR == nullptr[1]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FAKE_TRT_FAIL", "cuda_init")
        with pytest.raises(TypeError, match=re.escape(nullptr[1])):
            fake.Runtime(fake.ILogger())
