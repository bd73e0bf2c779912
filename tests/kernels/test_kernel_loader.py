"""The loader's choice (prebuilt fatbin or NVRTC) and its use of CuPy, against a test double of
CuPy's RawModule/device API: which code a GPU gets, the fallbacks, the cache folder CuPy compiles
into, one load per device, and the errors."""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys

import pytest

from kernel_tools import REPO
from fake_cupy import FakeCupy, source_entry_points
from flare_rt.errors import BackendUnavailableError, ConfigError
from flare_rt.kernels import loader
from flare_rt.kernels.loader import (ENTRY_POINTS, MODE_ENV, NVRTC_OPTIONS, Choice, KernelUnavailableError, Manifest,
                                     Package, choose, load_kernels, load_module)

MANIFEST = Manifest(source_sha256="s" * 64, fatbin_sha256="f" * 64, sass=(75, 80, 86, 89, 90), ptx=(90,),
                    nvcc="13.0.88")
OK = ("s" * 64, "f" * 64)


@pytest.mark.parametrize("cc, detail", [
    (75, "sm_75 cubin"),  # Turing: the FLARE reference card (Quadro RTX 5000)
    (80, "sm_80 cubin"),
    (86, "sm_86 cubin"),
    (87, "sm_86 cubin"),  # same major, higher minor: the newest cubin not above it
    (89, "sm_89 cubin"),
    (90, "sm_90 cubin"),
    (100, "compute_90 PTX compiled by the driver for sm_100"),  # Blackwell: no cubin, PTX
    (120, "compute_90 PTX compiled by the driver for sm_120"),
])
def test_prebuilt_for_every_listed_or_newer_architecture(cc, detail):
    choice = choose(cc, MANIFEST, *OK)
    assert choice.how == "prebuilt"
    assert choice.detail.startswith(detail) and "nvcc 13.0.88" in choice.detail


@pytest.mark.parametrize("cc, manifest, hashes, reason", [
    (70, MANIFEST, OK, "holds no code for sm_70"),  # Volta: older than every cubin and the PTX
    (86, None, OK, "no flare_kernels.json"),
    (86, MANIFEST, ("s" * 64, None), "flare_kernels.fatbin is missing"),
    (86, MANIFEST, ("x" * 64, "f" * 64), "stale"),
    (86, MANIFEST, ("s" * 64, "y" * 64), "does not match its manifest"),
])
def test_nvrtc_where_the_fatbin_cannot_serve(cc, manifest, hashes, reason):
    choice = choose(cc, manifest, *hashes)
    assert choice.how == "nvrtc" and reason in choice.detail
    with pytest.raises(KernelUnavailableError, match=f"{MODE_ENV}=prebuilt but"):
        choose(cc, manifest, *hashes, mode="prebuilt")


def test_modes():
    assert choose(86, MANIFEST, *OK, mode="nvrtc") == Choice("nvrtc", f"${MODE_ENV}=nvrtc")
    assert choose(86, MANIFEST, *OK, mode="prebuilt").how == "prebuilt"
    with pytest.raises(ConfigError, match="'fast'"):
        choose(86, MANIFEST, *OK, mode="fast")


def test_manifest_unreadable_is_none(tmp_path, caplog):
    assert Manifest.read(tmp_path / "missing.json") is None
    (tmp_path / "bad.json").write_text('{"sass": [75]}')
    with caplog.at_level(logging.WARNING):
        assert Manifest.read(tmp_path / "bad.json") is None
    assert "unreadable" in caplog.text


@pytest.fixture
def package(tmp_path) -> Package:
    """A copy of the package's kernel files (source, fatbin, manifest) that a test may damage."""
    folder = tmp_path / "kernels"
    folder.mkdir()
    real = Package()
    for path in (real.source, real.fatbin, real.manifest):
        shutil.copy(path, folder / path.name)
    return Package(folder)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FLARE_RT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("CUPY_CACHE_DIR", raising=False)
    return tmp_path / "cache" / "kernels"


def fake(**kw) -> FakeCupy:
    return FakeCupy(fatbin_entries=set(ENTRY_POINTS), **kw)


def test_prebuilt_fatbin_loaded(package, cache, caplog):
    cp = fake(cc="86")
    with caplog.at_level(logging.INFO, logger="flare_rt.kernels"):
        kernels = load_module(cp, 86, package=package)
    assert [m.path for m in cp.record.modules] == [str(package.fatbin)]
    assert set(kernels.functions) == set(ENTRY_POINTS)
    assert kernels.choice.how == "prebuilt" and "sm_86 cubin" in kernels.describe()
    assert "prebuilt fatbin, sm_86 cubin" in caplog.text
    assert not cache.exists()  # nothing compiled


@pytest.mark.parametrize("preset", [None, "/somewhere/else"])
def test_driver_refusal_compiles_the_same_source_into_the_cache(package, cache, caplog, monkeypatch, preset):
    if preset:
        monkeypatch.setenv("CUPY_CACHE_DIR", preset)
    cp = fake(cc="86", refuse_fatbin=True)
    original_backend = cp.cuda.compiler._kernel_cache_backend
    with caplog.at_level(logging.INFO, logger="flare_rt.kernels"):
        kernels = load_module(cp, 86, package=package)
    refused, compiled = cp.record.modules
    assert refused.path == str(package.fatbin)
    assert compiled.code == package.source.read_text() and compiled.options == NVRTC_OPTIONS
    compile_lookups = [lk for lk in cp.record.lookups if lk[0] is compiled]
    assert sorted(name for _, name, _, _ in compile_lookups) == sorted(ENTRY_POINTS)
    for _, _, env, backend_dir in compile_lookups:  # CuPy compiled with its cache in ours
        assert env == str(cache) and backend_dir == str(cache)
    assert cache.is_dir()
    assert os.environ.get("CUPY_CACHE_DIR") == preset  # restored afterwards
    assert cp.cuda.compiler._kernel_cache_backend is original_backend
    assert kernels.choice.how == "nvrtc" and "refused" in kernels.choice.detail
    assert "compiling flare_kernels.cu with NVRTC for sm_86: the driver refused" in caplog.text


def test_cache_for_cupy_before_14(package, cache):
    """Older CuPy reads $CUPY_CACHE_DIR at each compile and has no cache backend object."""
    cp = fake(cc="86", refuse_fatbin=True, modern_compiler=False)
    load_module(cp, 86, package=package)
    compiled = cp.record.modules[-1]
    assert {env for m, _, env, _ in cp.record.lookups if m is compiled} == {str(cache)}
    assert "CUPY_CACHE_DIR" not in os.environ


def test_stale_fatbin_is_not_loaded(package, cache, caplog):
    package.source.write_text(package.source.read_text() + "\n// edited after the build\n")
    cp = fake(cc="86")
    with caplog.at_level(logging.WARNING, logger="flare_rt.kernels"):
        kernels = load_module(cp, 86, package=package)
    assert [m.path for m in cp.record.modules] == [None]
    assert cp.record.modules[0].code.endswith("// edited after the build\n")
    assert "stale" in kernels.choice.detail and "stale" in caplog.text


def test_old_gpu_compiles_with_nvrtc(package, cache):
    cp = fake(cc="70")
    kernels = load_module(cp, 70, package=package)
    assert [m.path for m in cp.record.modules] == [None]
    assert "holds no code for sm_70" in kernels.choice.detail


def test_prebuilt_mode_does_not_fall_back(package, cache):
    with pytest.raises(KernelUnavailableError, match="does not load on this GPU/driver"):
        load_module(fake(cc="86", refuse_fatbin=True), 86, mode="prebuilt", package=package)


def test_compile_error_is_typed(package, cache):
    with pytest.raises(KernelUnavailableError, match=r"NVRTC could not compile .*flare_kernels.cu for sm_70") as err:
        load_module(fake(cc="70", compile_error=True), 70, package=package)
    assert isinstance(err.value, BackendUnavailableError)


def test_every_entry_point_is_in_the_source():
    assert source_entry_points(Package().source.read_text()) == set(ENTRY_POINTS)


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setattr(loader, "_loaded", {})
    monkeypatch.delenv(MODE_ENV, raising=False)


def test_loaded_once_per_device(fresh, cache):
    cp = fake(cc="89")
    first = load_kernels(cp)
    assert load_kernels(cp) is first and len(cp.record.modules) == 1
    cp.device_id = 1
    second = load_kernels(cp)
    assert second is not first and len(cp.record.modules) == 2


def test_mode_from_environment(fresh, cache, monkeypatch):
    monkeypatch.setenv(MODE_ENV, " NVRTC ")
    cp = fake(cc="89")
    assert load_kernels(cp).choice.how == "nvrtc"
    assert [m.path for m in cp.record.modules] == [None]


def test_no_device_is_typed(fresh):
    with pytest.raises(KernelUnavailableError, match="need a usable CUDA device"):
        load_kernels(fake(no_device=True))


def test_no_cupy_is_typed(fresh, monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)
    with pytest.raises(KernelUnavailableError, match=r"pip install 'flare-rt\[gpu\]'"):
        load_kernels()


def test_importing_the_kernels_imports_no_cupy():
    code = "import sys, flare_rt.kernels; assert 'cupy' not in sys.modules, 'cupy imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
