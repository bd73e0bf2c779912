"""predict.sh outside Docker, under dash, in the image's Python environment: a virtual environment on the
image's CPython (3.12) with flare-rt installed from its wheel and the default variant's pinned packages
(docker/constraints/; CuPy included, TensorRT left out: it cannot be installed here, and without a GPU
the CPU backend runs either way), the image's environment variables, the CPU device. Real CTs and one
corrupt case in inputs/, HOME read-only. The good cases are written with the input's geometry, the bad
one is listed, the exit status says not all succeeded, nothing is written elsewhere (site-packages
included: no bytecode at run time), and no PyTorch is there.

Root ignores permission bits, so as root (CI is) HOME, the working folder, the inputs and the checkout
are made read-only with read-only bind mounts in a private mount namespace (unshare -m);
as another user, mode 0555 does it. Either way a write there fails, and the trees are compared too."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from image_recipe import constraint_files, constraint_options, find_interpreter, image_python, installable
from flare_rt.errors import OutputError

REPO = Path(__file__).resolve().parents[2]
PREDICT = REPO / "predict.sh"
NOBODY = 65534
AS_ROOT = os.geteuid() == 0
CASES = {"sm": "ts_example_ct_sm.nii.gz", "full": "ts_example_ct.nii.gz"}


def dash() -> str:
    path = shutil.which("dash")
    assert path, "dash is not installed (apt-get install dash): predict.sh is tested under a strict POSIX sh"
    return path


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder below ``root`` with its size and mtime (what a write would change)."""
    out = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in (".git", ".venv")]  # .venv: read-only mounted all the same
        for name in dirs + files:
            p = Path(folder, name)
            st = p.lstat()
            out[str(p.relative_to(root))] = (st.st_size if p.is_file() else 0, st.st_mtime_ns)
    return out


def read_only(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o555)  # owned by the test's user: read-only for nobody, and for a non-root test user
    return path


def run_predict(env: dict, cwd: Path, read_only_paths=(), user: int | None = None) -> subprocess.CompletedProcess:
    """``dash predict.sh``; as root, with ``read_only_paths`` remounted read-only (or as ``user``)."""
    cmd = [dash(), str(PREDICT)]
    if AS_ROOT and user is not None:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]
    elif AS_ROOT and read_only_paths:
        mounts = " && ".join(f'mount --bind "{p}" "{p}" && mount -o remount,ro,bind "{p}"' for p in read_only_paths)
        cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c", f'{mounts} && exec "$0" "$@"', *cmd]
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=1200, check=False)


@pytest.fixture(scope="module")
def image_venv(wheel, tmp_path_factory) -> Path:
    """The image's Python environment (its Dockerfile's pip step, TensorRT left out): the venv's folder."""
    venv = tmp_path_factory.mktemp("image-env") / "venv"
    python = find_interpreter(image_python()[0])
    for cmd in ([str(python), "-m", "venv", str(venv)],
                [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-cache-dir",
                 *constraint_options("tensorrt"),
                 str(wheel), *installable("tensorrt", tensorrt=False)]):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, check=False)
        assert r.returncode == 0, f"{cmd[:4]}...: {r.stderr[-3000:]}"
    return venv


@pytest.fixture(scope="module")
def workspace(shared_data):
    base = Path(tempfile.mkdtemp(prefix="flare-predict-", dir="/tmp"))  # nobody must reach it
    base.chmod(0o755)
    inputs = base / "inputs"
    inputs.mkdir()
    for case, src in CASES.items():
        shutil.copyfile(shared_data / src, inputs / f"{case}_0000.nii.gz")
    (inputs / "broken_0000.nii.gz").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, np.uint8).tobytes())
    for p in inputs.iterdir():
        p.chmod(0o644)
    read_only(inputs)
    yield base
    for p in base.rglob("*"):
        if p.is_dir():
            p.chmod(0o755)
    shutil.rmtree(base)


def image_env(base: Path, venv: Path, **over) -> dict:
    """The image's environment (Dockerfile ENV), with the folders of this test and the CPU device."""
    env = {
        "PATH": f"{venv / 'bin'}{os.pathsep}/usr/bin:/bin",
        "HOME": str(base / "home"),
        "TMPDIR": str(base / "tmp"),
        "FLARE_RT_PYTHON": str(venv / "bin" / "python"),
        "FLARE_RT_INPUTS": str(base / "inputs"),
        "FLARE_RT_OUTPUTS": str(base / "outputs"),
        "FLARE_RT_CACHE": str(base / "cache"),
        "CUPY_CACHE_DIR": str(base / "cache" / "cupy"),
        "MPLCONFIGDIR": str(base / "mpl"),
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
        "FLARE_RT_VARIANT": "tensorrt",
        "FLARE_RT_BACKEND": "auto",
        "FLARE_RT_DEVICE": "cpu",
        "FLARE_RT_BATCH_SIZE": "2",
        "FLARE_RT_ENGINE_BUILD": "auto",
        "FLARE_RT_ARGS": "--step 1",  # abutting tiles: half the CPU time; the script is what is tested
    }
    env.update(over)
    return env


@pytest.fixture(scope="module")
def first_run(workspace, image_venv):
    base = workspace
    home, work = read_only(base / "home"), read_only(base / "workspace")
    for folder in ("outputs", "cache", "tmp", "mpl"):
        (base / folder).mkdir()
    watched = {"home": home, "workspace": work, "inputs": base / "inputs", "tmp": base / "tmp", "repo": REPO,
               "venv": image_venv}
    before = {name: tree(path) for name, path in watched.items()}
    # the environment stays writable, as in the image (root): the tree comparison catches a write there
    r = run_predict(image_env(base, image_venv), cwd=work, read_only_paths=(home, work, base / "inputs", REPO))
    after = {name: tree(path) for name, path in watched.items()}
    return r, base, before, after


def test_the_image_environment_is_the_default_variant(image_venv):
    """The image's Python, flare-rt from the wheel (not this checkout), CuPy, no PyTorch."""
    probe = ("import json, sys, importlib.util as u, flare_rt; print(json.dumps({'python': list(sys.version_info[:2]), "
             "'flare_rt': flare_rt.__file__, 'cupy': u.find_spec('cupy') is not None, 'torch': u.find_spec('torch') "
             "is not None}))")
    r = subprocess.run([str(image_venv / "bin" / "python"), "-c", probe], capture_output=True, text=True,
                       cwd="/", env={"PATH": "/usr/bin:/bin"}, check=False)
    assert r.returncode == 0, r.stderr
    found = json.loads(r.stdout)
    assert found["python"] == [int(n) for n in image_python()[0].split(".")]
    assert found["flare_rt"].startswith(str(image_venv)), found
    assert found["cupy"] and not found["torch"], found


def pin_check(venv: Path, *files: Path) -> subprocess.CompletedProcess:
    """docker/check_pins.sh, as the image's build runs it (its environment's python3 first on PATH)."""
    env = {"PATH": f"{venv / 'bin'}{os.pathsep}/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([dash(), str(REPO / "docker" / "check_pins.sh"), *map(str, files)], env=env, cwd="/",
                          capture_output=True, text=True, timeout=300, check=False)


def test_the_builds_pin_check_passes_the_image_environment_and_names_what_is_not_pinned(image_venv, tmp_path):
    """The Dockerfile ends its install with docker/check_pins.sh over the constraints it installed with: the
    image's environment passes; a distribution left unpinned, or installed at another version than its pin,
    fails the build and is named."""
    files = constraint_files("tensorrt")
    r = pin_check(image_venv, *files)
    assert r.returncode == 0 and "all pinned" in r.stdout, r.stderr
    common = files[0].read_text().splitlines()
    numpy_pin = next(ln for ln in common if ln.startswith("numpy=="))
    scipy_pin = next(ln for ln in common if ln.startswith("scipy=="))
    for name, lines, named in (("missing", [ln for ln in common if ln != numpy_pin], numpy_pin),
                               ("off-pin", [ln if ln != scipy_pin else "scipy==0.1" for ln in common], scipy_pin)):
        edited = tmp_path / f"{name}.txt"
        edited.write_text("\n".join(lines) + "\n")
        r = pin_check(image_venv, edited, files[1])
        assert r.returncode == 1, (name, r.stdout, r.stderr)
        assert f"  {named}" in r.stderr.splitlines() and "not pinned" in r.stderr, (name, r.stderr)
    assert pin_check(image_venv).returncode == 2
    assert pin_check(image_venv, tmp_path / "absent.txt").returncode == 2


@pytest.mark.slow
def test_good_cases_written_bad_case_listed(first_run, shared_data):
    r, base, _, _ = first_run
    assert r.returncode == 1, r.stderr
    outputs = base / "outputs"
    assert sorted(p.name for p in outputs.iterdir()) == ["full.nii.gz", "sm.nii.gz"]  # no temporary files either
    for case, src in CASES.items():
        seg, ct = sitk.ReadImage(str(outputs / f"{case}.nii.gz")), sitk.ReadImage(str(shared_data / src))
        assert seg.GetPixelID() == sitk.sitkUInt8
        assert seg.GetSize() == ct.GetSize() and seg.GetSpacing() == ct.GetSpacing()
        assert seg.GetOrigin() == ct.GetOrigin() and seg.GetDirection() == ct.GetDirection()
        assert len(np.unique(sitk.GetArrayViewFromImage(seg))) >= 3  # the model ran: organs found
    err = r.stderr
    assert "1 of 3 cases failed" in err
    failed = [ln.strip() for ln in err.splitlines() if ln.startswith("  ")]
    assert len(failed) == 1 and failed[0].startswith("broken_0000.nii.gz:"), err
    assert f"3 case(s) in {base / 'inputs'} -> {base / 'outputs'}; backend auto, device cpu, batch 2" in err
    assert "backend: onnxruntime on cpu" in err  # the image has no OpenVINO
    assert "predict.sh: done with failures: see the list above (2 label file(s)" in err


@pytest.mark.slow
def test_nothing_is_written_elsewhere(first_run):
    r, _, before, after = first_run
    assert r.returncode == 1, r.stderr
    for name in before:
        assert after[name] == before[name], f"predict.sh changed {name}: " \
            f"{sorted(set(after[name].items()) ^ set(before[name].items()))[:5]}"
    assert after["home"] == {} and after["tmp"] == {}


def test_a_non_root_user_cannot_write_a_root_owned_outputs_mount(workspace, image_venv):
    """Why the image runs as root: the organisers bind-mount their own outputs folder."""
    base = workspace
    outputs = base / "root_outputs"
    outputs.mkdir(exist_ok=True)
    outputs.chmod(0o755 if AS_ROOT else 0o555)  # root-owned 0755 (as root), or simply read-only
    r = run_predict(image_env(base, image_venv, FLARE_RT_OUTPUTS=str(outputs)), cwd=base, user=NOBODY)
    assert r.returncode == OutputError.exit_code == 8, r.stderr  # flare-rt's own code for it
    uid = NOBODY if AS_ROOT else os.geteuid()
    assert f"cannot write into {outputs} as uid {uid}; run the container as root" in r.stderr
    assert list(outputs.iterdir()) == []


def test_no_input_case_is_an_error(workspace, image_venv):
    empty = workspace / "empty_inputs"
    empty.mkdir(exist_ok=True)
    empty.chmod(0o755)
    r = run_predict(image_env(workspace, image_venv, FLARE_RT_INPUTS=str(empty)), cwd=workspace)
    assert r.returncode == 2 and f"no *_0000.nii.gz case in {empty}" in r.stderr
