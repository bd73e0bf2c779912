"""Preparation of the GPU check: the wheel list, the files it produces, the payload check."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import gpu_prepare
from gpu_prepare import PayloadError, Requirement

FIXTURES = Path(__file__).parent / "fixtures"
BENCH = Path(gpu_prepare.__file__).parent
REPO = BENCH.parent


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def device_packages() -> set[str]:
    lines = (FIXTURES / "h200_packages.txt").read_text().splitlines()
    return {norm(ln.strip()) for ln in lines if ln.strip() and not ln.startswith("#")}


def test_requirements_parse_and_pin_versions():
    reqs = gpu_prepare.parse_requirements()
    assert all(r.version and r.version[0].isdigit() for r in reqs)
    assert Requirement("acvl_utils", "0.2.6", sdist=True) in reqs
    names = [norm(r.name) for r in reqs]
    assert len(names) == len(set(names))  # one version of each
    assert not set(names) & device_packages()  # nothing the device machine already has


@pytest.mark.parametrize("line", ["nibabel", "nibabel>=5", "nibabel==5.4 wheel", "==1.0"])
def test_bad_requirement_lines_are_named(tmp_path, line):
    p = tmp_path / "w.txt"
    p.write_text(f"# comment\n{line}\n")
    with pytest.raises(ValueError, match=r"w.txt:2: expected 'name==version \[sdist\]'"):
        gpu_prepare.parse_requirements(p)


def test_planned_files_match_the_fixture():
    reqs = gpu_prepare.parse_requirements()
    want = (FIXTURES / "gpucheck_files.txt").read_text().split()
    assert gpu_prepare.plan_files(reqs, "ts_demo_small_nnunet", "0", carry_checkpoint=True) == want
    without = gpu_prepare.plan_files(reqs, "ts_demo_small_nnunet", "0", carry_checkpoint=False)
    assert without == [f for f in want if not f.endswith(".pth")]
    assert Requirement("connected-components-3d", "4.1.1").wheel_prefix == "connected_components_3d-4.1.1-"


def test_checkpoint_decision():
    mib = 2**20
    assert gpu_prepare.decide_checkpoint("auto", 14 * mib, 16 * mib, 22 * mib)  # 52 MiB: fits with the margin
    assert not gpu_prepare.decide_checkpoint("auto", 30 * mib, 16 * mib, 22 * mib)  # 68 MiB: rebuilt there
    assert gpu_prepare.decide_checkpoint("auto", 22 * mib, 16 * mib, 22 * mib)  # 60 MiB: exactly the margin left
    assert not gpu_prepare.decide_checkpoint("auto", 23 * mib, 16 * mib, 22 * mib)  # 61 MiB: inside the margin
    assert gpu_prepare.decide_checkpoint("checkpoint", 60 * mib, 16 * mib, 22 * mib)
    assert not gpu_prepare.decide_checkpoint("bundle", 1, 1, 1)


def _sparse(path: Path, size: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def test_payload_check_without_git(tmp_path):
    root = tmp_path / "tree"
    _sparse(root / "flare_rt" / "a.py", 10 * 2**20)
    _sparse(root / ".git" / "objects" / "pack", 500 * 2**20)  # never travels
    _sparse(root / "x" / "__pycache__" / "a.pyc", 100 * 2**20)
    carried = root / ".gpucheck"
    _sparse(carried / "wheels" / "a.whl", 40 * 2**20)
    p = gpu_prepare.payload(root, [carried])
    assert p["repo_bytes"] == 10 * 2**20 and p["carried_bytes"] == {".gpucheck": 40 * 2**20}
    assert gpu_prepare.check_payload(p) == "payload 50.0 MiB of 64.0 MiB: repository 10.0 MiB, .gpucheck 40.0 MiB"
    _sparse(carried / "model" / "ckpt.pth", 15 * 2**20)
    with pytest.raises(PayloadError, match=r"payload 65.0 MiB of 64.0 MiB: .* OVER the limit"):
        gpu_prepare.check_payload(gpu_prepare.payload(root, [carried]))


def test_payload_counts_what_git_would_send(tmp_path):
    root = tmp_path / "repo"
    root.mkdir()
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    (root / ".gitignore").write_text("/.gpucheck/\n/build/\n")
    _sparse(root / "tracked.py", 2**20)
    subprocess.run(["git", "-C", str(root), "add", "tracked.py", ".gitignore"], check=True)
    _sparse(root / "untracked.py", 3 * 2**20)  # travels: untracked but not ignored
    _sparse(root / "build" / "lib.so", 50 * 2**20)  # ignored: stays behind
    _sparse(root / ".gpucheck" / "w.whl", 5 * 2**20)  # ignored but carried
    p = gpu_prepare.payload(root, [root / ".gpucheck"])
    assert p["repo_bytes"] == 4 * 2**20 + len("/.gpucheck/\n/build/\n")
    assert p["carried_bytes"] == {".gpucheck": 5 * 2**20}


def test_this_repository_ignores_the_carried_folder():
    files = gpu_prepare.repo_files(REPO, [REPO / ".gpucheck"])
    assert files and not any(".gpucheck" in f.parts for f in files)
    res = subprocess.run(["git", "-C", str(REPO), "check-ignore", "-q", ".gpucheck/manifest.json"])
    assert res.returncode == 0, ".gpucheck/ must be git-ignored (it is carried, not committed)"


def test_verify_finds_missing_and_changed_files(tmp_path):
    dest = tmp_path / gpu_prepare.DEST
    (dest / "wheels").mkdir(parents=True)
    (dest / "wheels" / "a.whl").write_bytes(b"abc")
    (dest / "b.json").write_bytes(b"{}")
    manifest = {"files": [{"path": "wheels/a.whl", "bytes": 3, "sha256": gpu_prepare.file_sha256(dest / "wheels/a.whl")},
                          {"path": "b.json", "bytes": 2, "sha256": "0" * 64},
                          {"path": "model/c.pth", "bytes": 1, "sha256": "0" * 64}]}
    (dest / "manifest.json").write_text(json.dumps(manifest))
    problems = gpu_prepare.verify(tmp_path)
    assert len(problems) == 2
    assert problems[0].endswith("b.json: differs from the manifest") and problems[1].endswith("c.pth: missing")
    assert "run bench/gpu_prepare.py" in gpu_prepare.verify(tmp_path / "nothing")[0]


TRACE = textwrap.dedent("""
    import importlib, json, sys
    for hidden in ("SimpleITK", "pydot", "imagecodecs"):  # absent on the device machine
        sys.modules[hidden] = None
    sys.path[:0] = [{bench!r}, {repo!r}]
    import nnunet_peer
    assert nnunet_peer.install_simpleitk_stand_in()
    # what a GPU check process imports: nnU-Net's predictor as the peer and its export run it, the trainer
    # class its model loading looks up, NibabelIO; flare-rt's CLI, pipeline and torch backend; the bench tools
    import nnunetv2
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape
    from nnunetv2.imageio.nibabel_reader_writer import NibabelIO
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class
    from pathlib import Path
    recursive_find_python_class(str(Path(nnunetv2.__path__[0]) / "training" / "nnUNetTrainer"), "nnUNetTrainer",
                                "nnunetv2.training.nnUNetTrainer")
    for mod in ("flare_rt.cli", "flare_rt.pipeline", "flare_rt.backends.torch_backend", "run", "plot_memory",
                "estimate", "xp_agreement", "nnunet_folder", "gpu_prepare", "cases"):
        importlib.import_module(mod)
    stand_ins = [m for m, mod in list(sys.modules.items()) if (getattr(mod, "__doc__", None) or "").startswith("stand-in")]
    loaded = [m for m, mod in list(sys.modules.items()) if mod is not None]  # None: hidden, import failed
    print(json.dumps({{"modules": sorted({{m.split(".")[0] for m in loaded}} - set(stand_ins)),
                       "stand_ins": stand_ins}}))
""")


@pytest.mark.slow
def test_carried_wheels_cover_every_import_the_device_lacks():
    out = subprocess.run([sys.executable, "-c", TRACE.format(bench=str(BENCH), repo=str(REPO))], capture_output=True,
                         text=True, timeout=600, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    trace = json.loads(out.stdout.strip().splitlines()[-1])
    modules = trace["modules"]
    assert trace["stand_ins"] == ["SimpleITK"]
    from importlib.metadata import packages_distributions

    dists = packages_distributions()
    needed = {norm(d) for m in modules if m not in sys.stdlib_module_names for d in dists.get(m, [])}
    missing_there = needed - device_packages() - {"flare-rt"}
    carried = {norm(r.name) for r in gpu_prepare.parse_requirements()}
    assert "simpleitk" not in needed  # only the stand-in was imported
    assert missing_there <= carried, f"imported there but neither installed nor carried: {missing_there - carried}"
    assert carried <= needed, f"carried but never imported: {carried - needed}"
