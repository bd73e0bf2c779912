"""The CLI as a whole: every subcommand reports errors the same way, the outputs users expect
(statistics, preview) are written, and the package's layers import what they should and no more."""
from __future__ import annotations

import ast
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from cli_errors import one_error_line

from flare_rt.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "flare_rt"
QUICK = ("--step", "1")


def test_every_subcommand_is_registered():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert {"segment", "info", "import-nnunet", "export", "evaluate", "train"} <= set(sub.choices)


@pytest.mark.parametrize("argv, code, words", [
    (["evaluate", "/nonexistent/pred", "/nonexistent/gt"], None, ["/nonexistent"]),
    (["train", "no-such-preset"], 6, ["no-such-preset"]),
    (["info", "/nonexistent/model.onnx"], 3, ["/nonexistent/model.onnx", "not found"]),
    (["segment", "a.nii.gz", "b.nii.gz", "--part", "1/2"], 2, ["a.nii.gz"]),
    (["segment", "examples/ts_example_ct.nii.gz", "out.nii.gz", "--series", "1.2.3"], 6,
     ["--series", "examples/ts_example_ct.nii.gz is an image file"]),
    (["segment", "examples/ts_example_ct.nii.gz", "out.nii.gz", "--mode", "faithful", "--fast-option", "roi=0"], 6,
     ["--mode faithful"]),
])
def test_subcommands_report_errors_alike(capsys, monkeypatch, argv, code, words):
    monkeypatch.chdir(REPO)
    rc = main([*argv, "-q"]) if argv[0] not in ("evaluate", "train") else main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(lines) == 1 and lines[0].startswith("flare-rt: error: "), err
    assert rc != 0 and (code is None or rc == code), (rc, err)
    for w in words:
        assert w in lines[0], (w, lines[0])


def test_statistics_and_preview_of_one_case(tmp_path, small_ct_path):
    out = tmp_path / "seg.nii.gz"
    assert main(["segment", str(small_ct_path), str(out), "--statistics", "--preview", "-q", *QUICK]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seg.nii.gz", "seg_preview.png", "seg_statistics.json"]
    report = json.loads((tmp_path / "seg_statistics.json").read_text())
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
    img = sitk.ReadImage(str(small_ct_path))
    voxel_ml = np.prod(img.GetSpacing()) / 1000
    liver = report["structures"]["liver"]
    assert liver["voxels"] == int((labels == 1).sum()) > 0
    assert liver["volume_ml"] == pytest.approx(liver["voxels"] * voxel_ml, abs=1e-4)
    assert liver["mean_hu"] == pytest.approx(float(sitk.GetArrayFromImage(img)[labels == 1].mean()), abs=0.01)
    absent = [s for s in report["structures"].values() if s["voxels"] == 0]
    assert absent and all(s["volume_ml"] == 0 and s["mean_hu"] is None for s in absent)
    with open(tmp_path / "seg_preview.png", "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    # explicit paths, and an existing one is refused without --overwrite
    stats = tmp_path / "elsewhere" / "s.json"
    rc = main(["segment", str(small_ct_path), str(out), "--statistics", str(stats), "--overwrite", "-q", *QUICK])
    assert rc == 0 and json.loads(stats.read_text())["structures"] == report["structures"]
    assert main(["segment", str(small_ct_path), str(tmp_path / "new.nii.gz"), "--statistics", str(stats), "-q"]) == 8


def test_folder_statistics_csv_has_a_row_per_case(tmp_path, small_ct_path):
    src = tmp_path / "in"
    src.mkdir()
    for name in ("p1", "p2"):
        shutil.copyfile(small_ct_path, src / f"{name}_0000.nii.gz")
    out = tmp_path / "out"
    assert main(["segment", str(src), str(out), "--statistics", "--preview", "-q", *QUICK]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["p1.nii.gz", "p1_preview.png", "p1_statistics.json",
                                                     "p2.nii.gz", "p2_preview.png", "p2_statistics.json",
                                                     "statistics.csv"]
    with open(out / "statistics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["case"] for r in rows] == ["p1", "p2"]
    liver = json.loads((out / "p1_statistics.json").read_text())["structures"]["liver"]
    assert float(rows[0]["liver_volume_ml"]) == pytest.approx(liver["volume_ml"])
    assert rows[0] == rows[1] | {"case": "p1"}


@pytest.fixture
def one_case_folder(tmp_path, small_ct_path) -> Path:
    src = tmp_path / "in"
    src.mkdir()
    shutil.copyfile(small_ct_path, src / "p1_0000.nii.gz")
    return src


@pytest.mark.parametrize("option, words", [
    (["--preview", "p.png"], ["--preview p.png", "folder mode writes <case>_preview.png"]),
    (["--series", "1.2.3"], ["--series", "is a folder of *_0000.nii.gz cases"]),
    (["--save-network-labels", "n.npz"], ["--save-network-labels applies to a single image"]),
])
def test_single_image_options_are_refused_in_folder_mode(capsys, tmp_path, one_case_folder, option, words):
    """Not silently ignored: one line, exit 6, before any work (no output folder)."""
    rc = main(["segment", str(one_case_folder), str(tmp_path / "out"), *option, "-q"])
    line = one_error_line(capsys)
    assert rc == 6 and all(w in line for w in words), line
    assert not (tmp_path / "out").exists()


def test_a_folder_run_s_report_must_be_a_file(capsys, tmp_path, one_case_folder):
    rc = main(["segment", str(one_case_folder), str(tmp_path / "out"), "--report", str(one_case_folder), "-q"])
    assert rc == 8 and f"{one_case_folder}: is a folder" in one_error_line(capsys)
    assert not (tmp_path / "out").exists()


def on_a_terminal(cmd: list[str]) -> str:
    """What ``cmd`` writes to a 120-column pseudo-terminal (stdout and stderr), after it exits with 0."""
    import fcntl
    import os
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # a new pty is 0 columns wide
    proc = subprocess.Popen(cmd, cwd=REPO, stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.wait(timeout=300) == 0
    return b"".join(chunks).decode(errors="replace")


def test_progress_bars_only_on_a_terminal_and_never_through_a_log_line(tmp_path, small_ct_path):
    """The tile bar (one file) and the case bar (folder mode) are drawn on a terminal only (logs and
    containers get plain lines), and there every log line starts a line of its own instead of running
    on after a bar."""
    src = tmp_path / "in"
    src.mkdir()
    for name in ("p1", "p2"):
        shutil.copyfile(small_ct_path, src / f"{name}_0000.nii.gz")
    segment = [sys.executable, "-m", "flare_rt", "segment", "--threads", "1", *QUICK]

    piped = subprocess.run([*segment, str(src), str(tmp_path / "piped")], cwd=REPO, capture_output=True, timeout=300)
    stderr = piped.stderr.decode()  # bytes: text mode would turn a bar's carriage returns into newlines
    assert piped.returncode == 0, stderr
    assert "\r" not in stderr and stderr.count("INFO flare_rt.pipeline") == 2

    for args, bar in [((str(src), str(tmp_path / "tty")), "segment:"),
                      ((str(small_ct_path), str(tmp_path / "one.nii.gz")), "tiles:")]:
        screen = on_a_terminal([*segment, *args])
        assert bar in screen  # the bar was drawn
        starts = [i for i in range(len(screen)) if screen.startswith(("INFO ", "WARNING ", "ERROR "), i)]
        assert len(starts) >= 4
        assert all(i == 0 or screen[i - 1] in "\r\n" for i in starts), [screen[max(0, i - 40):i] for i in starts]


# -- layers ---------------------------------------------------------------------------------------------
def imports_of(path: Path) -> set[str]:
    """flare_rt modules imported by a source file (absolute and relative imports, at any depth)."""
    module = ".".join(path.relative_to(REPO).with_suffix("").parts)
    package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module.rsplit(".__init__", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("flare_rt")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.startswith("flare_rt"):
                out.add(name)
                out |= {f"{name}.{a.name}" for a in node.names}
    return out


def edges() -> dict[str, set[str]]:
    return {".".join(p.relative_to(REPO).with_suffix("").parts): imports_of(p) for p in PACKAGE.rglob("*.py")}


def test_import_graph_keeps_the_layers_apart():
    graph = edges()
    bad = []
    for mod, deps in graph.items():
        if mod.startswith("flare_rt.backends"):
            bad += [(mod, d) for d in deps if d.startswith(("flare_rt.train", "flare_rt.export"))]
        if mod.startswith("flare_rt.train"):
            bad += [(mod, d) for d in deps if d.startswith("flare_rt.backends")]
    assert bad == []
    # the check sees real edges: the trainer does import the nets, the torch backend too
    assert any(d.startswith("flare_rt.nets") for d in graph["flare_rt.train.model"])
    assert any(d.startswith("flare_rt.nets") for d in graph["flare_rt.backends.torch_backend"])


def run_python(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_cpu_path_imports_no_gpu_or_training_package():
    """``import flare_rt``, the CLI, the network config and ``--device auto`` on a machine without a GPU
    import neither torch nor CuPy nor TensorRT."""
    out = run_python(
        "import sys; import flare_rt, flare_rt.cli, flare_rt.nets, flare_rt.pipeline\n"
        "from flare_rt.backends import resolve_device\n"
        "from flare_rt.devices import cuda_device_count\n"
        "dev = resolve_device('auto')\n"
        "print(dev, cuda_device_count(), sorted(m for m in ('torch', 'cupy', 'tensorrt') if m in sys.modules))")
    assert out == "cpu 0 []"


def test_segmenting_writes_only_the_output_and_the_cache(tmp_path, small_ct_path):
    """A run writes its output and, at most, flare-rt's cache: nothing in HOME, the XDG cache or TMPDIR,
    all of them writable here. ONNX Runtime 1.32 writes a device id and an event database under
    ~/.cache/Microsoft and a session file in TMPDIR when it loads unless its telemetry is off, which
    flare-rt does (backends.onnxrt.import_onnxruntime) unless the caller set ORT_DISABLE_TELEMETRY."""
    folders = {name: tmp_path / name for name in ("home", "xdg", "tmp", "cache", "out")}
    for folder in folders.values():
        folder.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("ORT_DISABLE_TELEMETRY", "XDG_CACHE_HOME")}
    env.update(HOME=str(folders["home"]), XDG_CACHE_HOME=str(folders["xdg"]), TMPDIR=str(folders["tmp"]),
               FLARE_RT_CACHE=str(folders["cache"]), PYTHONDONTWRITEBYTECODE="1")
    out = folders["out"] / "seg.nii.gz"
    # ONNX Runtime, the base install's backend (OpenVINO, where installed, writes a telemetry client id
    # under ~/intel when imported: Intel's opt-out is its `opt_in_out --opt_out`)
    r = subprocess.run([sys.executable, "-m", "flare_rt", "segment", "--backend", "onnxruntime", "--threads", "1",
                        *QUICK, str(small_ct_path), str(out)], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert [p.name for p in folders["out"].iterdir()] == ["seg.nii.gz"]
    for name in ("home", "xdg", "tmp"):
        written = sorted(str(p.relative_to(folders[name])) for p in folders[name].rglob("*"))
        assert not written, f"segmenting wrote into {name.upper()}: {written}"
