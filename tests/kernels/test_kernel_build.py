"""The kernels build on a CPU machine: CMake/nvcc compiles the source for every listed architecture
into one fatbin (one cubin per architecture + PTX for the newest), the committed fatbin is the one
built from the committed source, and NVRTC (the run-time path) compiles the same source."""
from __future__ import annotations

import hashlib
import json
import re
import zipfile
from pathlib import Path

import pytest

from kernel_tools import REPO, run
from flare_rt.kernels.loader import ENTRY_POINTS, NVRTC_OPTIONS, Manifest, Package

PACKAGE = Package()
#: What the fatbin must hold: Turing (the FLARE reference card, sm_75) through Hopper, plus PTX.
EXPECTED_SASS = (75, 80, 86, 89, 90)
EXPECTED_PTX = (90,)


def elf_archs(cuobjdump: Path, fatbin: Path) -> list[int]:
    out = run(cuobjdump, "--list-elf", fatbin)
    return [int(m) for m in re.findall(r"^ELF file\s+\d+: .*\.sm_(\d+)\.cubin$", out, re.M)]


def ptx_archs(cuobjdump: Path, fatbin: Path) -> list[int]:
    out = run(cuobjdump, "--list-ptx", fatbin)
    return [int(m) for m in re.findall(r"^PTX file\s+\d+: .*\.sm_(\d+)\.ptx$", out, re.M)]


def entry_symbols(cuobjdump: Path, binary: Path) -> dict[int, set[str]]:
    """Kernel entry symbols of each cubin (keyed by sm) of a fatbin or a single cubin."""
    out = run(cuobjdump, "--dump-elf-symbols", binary)
    found: dict[int, set[str]] = {}
    arch = None
    if "arch = sm_" not in out:  # a single cubin: its architecture is in the ELF header
        arch = int(re.search(r"\bsm=(\d+)", run(cuobjdump, "--dump-elf", binary)).group(1))
        found[arch] = set()
    for line in out.splitlines():
        m = re.match(r"\s*arch = sm_(\d+)", line)
        if m:
            arch = int(m.group(1))
            found.setdefault(arch, set())
        elif "ENTRY" in line and arch is not None:
            found[arch].add(line.split()[-1])
    return found


def ptx_entries(cuobjdump: Path, fatbin: Path) -> set[str]:
    return set(re.findall(r"\.entry (\w+)\(", run(cuobjdump, "--dump-ptx", fatbin)))


def cmake_archs() -> tuple[int, ...]:
    m = re.search(r'set\(FLARE_CUDA_ARCHS "([0-9;]+)"', (REPO / "CMakeLists.txt").read_text())
    assert m, "CMakeLists.txt must set FLARE_CUDA_ARCHS"
    return tuple(int(a) for a in m.group(1).split(";"))


@pytest.fixture(scope="module")
def built(tmp_path_factory, cmake, nvcc) -> Path:
    """`cmake -S . -B build && cmake --build build`, installing into a temporary folder (not the package)."""
    tmp = tmp_path_factory.mktemp("kernels")
    run(cmake, "-S", REPO, "-B", tmp / "build", f"-DFLARE_KERNELS_DEST={tmp / 'dest'}", f"-DFLARE_NVCC={nvcc}")
    run(cmake, "--build", tmp / "build")
    return tmp / "dest"


def test_cmake_lists_the_architectures():
    assert cmake_archs() == EXPECTED_SASS


def test_cmake_build_holds_every_architecture(built, cuobjdump):
    fatbin = built / "flare_kernels.fatbin"
    manifest = Manifest.read(built / "flare_kernels.json")
    assert manifest is not None
    assert manifest.sass == EXPECTED_SASS and manifest.ptx == EXPECTED_PTX
    assert manifest.source_sha256 == hashlib.sha256(PACKAGE.source.read_bytes()).hexdigest()
    assert manifest.fatbin_sha256 == hashlib.sha256(fatbin.read_bytes()).hexdigest()
    assert elf_archs(cuobjdump, fatbin) == list(EXPECTED_SASS)  # exactly one cubin per architecture
    assert ptx_archs(cuobjdump, fatbin) == list(EXPECTED_PTX)
    symbols = entry_symbols(cuobjdump, fatbin)
    assert set(symbols) == set(EXPECTED_SASS)
    for arch, names in symbols.items():
        assert names == set(ENTRY_POINTS), f"sm_{arch}: {names}"
    assert ptx_entries(cuobjdump, fatbin) == set(ENTRY_POINTS)


def test_committed_fatbin_is_not_stale(cuobjdump):
    """Fails when flare_kernels.cu changed without a rebuild (or the fatbin and its manifest disagree):
    run `cmake -S . -B build && cmake --build build` and commit flare_rt/kernels/flare_kernels.*."""
    manifest = Manifest.read(PACKAGE.manifest)
    assert manifest is not None, f"{PACKAGE.manifest} is missing"
    assert manifest.source_sha256 == hashlib.sha256(PACKAGE.source.read_bytes()).hexdigest(), \
        "flare_kernels.fatbin is stale: rebuild with `cmake -S . -B build && cmake --build build`"
    assert manifest.fatbin_sha256 == hashlib.sha256(PACKAGE.fatbin.read_bytes()).hexdigest()
    assert manifest.sass == cmake_archs() and manifest.ptx == (cmake_archs()[-1],)
    assert elf_archs(cuobjdump, PACKAGE.fatbin) == list(manifest.sass)
    assert ptx_archs(cuobjdump, PACKAGE.fatbin) == list(manifest.ptx)
    assert all(names == set(ENTRY_POINTS) for names in entry_symbols(cuobjdump, PACKAGE.fatbin).values())
    assert PACKAGE.fatbin.stat().st_size < 256 * 1024  # small enough to commit
    json.loads(PACKAGE.manifest.read_text())  # plain JSON, as CMake wrote it


def test_wheel_carries_the_kernels(wheel):
    """`pip install` never needs nvcc: the wheel holds the fatbin, its manifest and the source."""
    with zipfile.ZipFile(wheel) as zf:
        for name in (PACKAGE.source, PACKAGE.fatbin, PACKAGE.manifest):
            assert zf.read(f"flare_rt/kernels/{name.name}") == name.read_bytes()
        assert "flare_rt/kernels/README.md" in zf.namelist()


def test_source_needs_no_headers():
    """NVRTC compiles without the toolkit's headers, so the source includes none."""
    assert not re.search(r"^\s*#\s*include", PACKAGE.source.read_text(), re.M)


# The run-time path: the same source through NVRTC with the loader's options (plus the -ftz=true
# CuPy always adds), for every architecture of the fatbin and for GPUs newer than it.
@pytest.mark.parametrize("arch", [*EXPECTED_SASS, 100, 120])
def test_nvrtc_compiles_the_same_source(nvrtc, cuobjdump, tmp_path, arch):
    if nvrtc.version() < (12, 8) and arch >= 100:
        pytest.fail(f"NVRTC {nvrtc.version()} predates sm_{arch}; the dev extra installs NVRTC 13")
    options = (*NVRTC_OPTIONS, "-ftz=true", f"--gpu-architecture=sm_{arch}")
    status, log, ptx, cubin = nvrtc.compile(PACKAGE.source.read_text(), options)
    assert status == 0, log
    assert set(re.findall(rb"\.entry (\w+)\(", ptx)) == {e.encode() for e in ENTRY_POINTS}
    path = tmp_path / f"flare_kernels.sm_{arch}.cubin"
    path.write_bytes(cubin)
    assert entry_symbols(cuobjdump, path) == {arch: set(ENTRY_POINTS)}


def test_float_arithmetic_is_explicit_ieee(nvrtc):
    """The kernels' float products and sums are PTX mul.rn/add.rn without .ftz (never contracted into
    an FMA, subnormals kept), whatever -ftz/-fmad the compiler was given."""
    for flags in (("-ftz=true", "-fmad=true"), ("-ftz=false", "-fmad=false")):
        status, log, ptx, _ = nvrtc.compile(PACKAGE.source.read_text(),
                                            (*NVRTC_OPTIONS, *flags, "--gpu-architecture=compute_75"))
        assert status == 0, log
        text = ptx.decode()
        for entry in ENTRY_POINTS:
            body = text[text.index(f".entry {entry}("):]
            body = body[:body.index("\n}\n")]
            assert "mul.rn.f32" in body and "add.rn.f32" in body
            assert not re.search(r"\b(fma|mad)\.[a-z.]*f32", body), f"{entry}: contracted float ops"
            assert not re.search(r"\b(mul|add|sub|setp\.\w+)\.ftz", body), f"{entry}: flush-to-zero ops"
