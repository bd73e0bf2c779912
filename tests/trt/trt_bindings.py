"""NVIDIA's real TensorRT Python bindings on a machine without TensorRT's libraries (imported by the tests
of this folder as ``trt_bindings``).

The bindings are a PyPI wheel, ``tensorrt-cu12-bindings`` (the dev extra pins the challenge image's
version); the libraries they link against come only from NVIDIA's index. Over the stub libraries of
``bindings/stub_nvinfer.c`` they import, and ``bindings/surface.py``, run in a subprocess, reports their API
and what flare-rt's TensorRT code does with them. More versions: unpack their bindings wheels and list the
folders in ``$FLARE_RT_TRT_BINDINGS`` (``os.pathsep``-separated).
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).with_name("bindings")
BINDINGS_ENV = "FLARE_RT_TRT_BINDINGS"
#: TensorRT major -> the vtable slot of ILogger::log (see stub_nvinfer.c); stub sonames libnvinfer.so.<major>, ...
LOG_SLOTS = {10: 0, 11: 4}
LIBRARIES = ("nvinfer", "nvinfer_plugin", "nvonnxparser")


def installed_site() -> Path | None:
    """The folder holding the installed ``tensorrt_bindings`` package (found, not imported)."""
    spec = importlib.util.find_spec("tensorrt_bindings")
    return Path(spec.origin).parent.parent if spec and spec.origin else None


def extra_sites() -> list[Path]:
    return [Path(p) for p in os.environ.get(BINDINGS_ENV, "").split(os.pathsep) if p]


def build_stubs(dest: Path) -> Path:
    """The stub libraries, one set per TensorRT major, compiled into ``dest``."""
    cc = shutil.which("cc") or shutil.which("gcc")
    assert cc, "no C compiler (cc/gcc) to build the stub TensorRT libraries the real bindings load over"
    dest.mkdir(parents=True, exist_ok=True)
    for major, slot in LOG_SLOTS.items():
        for lib in LIBRARIES:
            soname = f"lib{lib}.so.{major}"
            subprocess.run([cc, "-shared", "-fPIC", "-O1", "-Wall", "-Werror", f"-DLOG_SLOT={slot}",
                            f"-Wl,-soname,{soname}", "-o",
                            str(dest / soname), str(HERE / "stub_nvinfer.c")], check=True)
    return dest


def surface(site: Path, stubs: Path) -> dict:
    """``bindings/surface.py``'s report for the bindings in ``site``."""
    def first(path: Path, var: str) -> str:
        return os.pathsep.join(p for p in (str(path), os.environ.get(var, "")) if p)

    env = {**os.environ, "PYTHONPATH": first(site, "PYTHONPATH"), "LD_LIBRARY_PATH": first(stubs, "LD_LIBRARY_PATH")}
    proc = subprocess.run([sys.executable, str(HERE / "surface.py")], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"the real bindings in {site} did not import over the stubs:\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout)


def fetch(dest: Path, version: str) -> Path:
    """NVIDIA's bindings wheel of TensorRT ``version`` from PyPI, unpacked (not installed: every version's
    module is ``tensorrt_bindings``) into a folder of ``dest``, whose path is returned for
    ``$FLARE_RT_TRT_BINDINGS``. Reuses an earlier unpacking."""
    import zipfile

    major = int(version.split(".")[0])
    package = f"tensorrt-cu{12 if major < 11 else 13}-bindings"
    site = dest / f"{package}-{version}"
    if (site / "tensorrt_bindings").is_dir():
        return site
    wheels = dest / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--dest", str(wheels), f"{package}=={version}"], check=True)
    name = package.replace("-", "_")
    wheel, = sorted(wheels.glob(f"{name}-{version}-*.whl"))
    partial = site.with_name(site.name + ".partial")  # renamed when whole: an interrupted run is not reused
    shutil.rmtree(partial, ignore_errors=True)
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(partial)
    partial.rename(site)
    return site


if __name__ == "__main__":
    # python tests/trt/trt_bindings.py DEST: fetch TensorRT 11's bindings (the double's 11.x) and print the
    # folder to put in $FLARE_RT_TRT_BINDINGS (.ci/run does this).
    sys.path.insert(0, str(Path(__file__).parent))
    from trt_doubles import TRT11

    if len(sys.argv) != 2:
        sys.exit(f"usage: python {sys.argv[0]} DEST")
    print(fetch(Path(sys.argv[1]).resolve(), TRT11))
