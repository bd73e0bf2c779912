"""The export/ recipes, run under dash as their users run them: nnU-Net folder -> verified fp32 and
fp16 bundles (real export), bundle -> engine and timing cache for a named GPU (TensorRT double in a
subprocess), and the baking recipe's docker commands (a docker double that records them)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FAKES = REPO / "tests" / "trt" / "fakes"
EXPORT = REPO / "export"


def sh(script: str, *args, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    dash = shutil.which("dash")
    assert dash, "dash is not installed (apt-get install dash)"
    base = {**os.environ, "FLARE_RT_PYTHON": sys.executable, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([dash, str(EXPORT / script), *map(str, args)], env={**base, **(env or {})}, cwd=cwd,
                          capture_output=True, text=True, timeout=900, check=False)


@pytest.mark.slow
def test_bundles_from_an_nnunet_folder(demo_nnunet_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "demo_fp32.onnx").write_bytes(b"an earlier bundle")  # replaced: FLARE_RT_OVERWRITE=1
    r = sh("bundles.sh", demo_nnunet_dir, out, "demo",
           env={"FLARE_RT_IMPORT_ARGS": "--demo", "FLARE_RT_OVERWRITE": "1"})
    assert r.returncode == 0, r.stderr
    from flare_rt.bundle import Bundle
    from flare_rt.onnx_graph import non_fp32_norms

    assert sorted(p.name for p in out.iterdir()) == ["demo_fp16.onnx", "demo_fp32.onnx"]
    fp32, fp16 = Bundle.load(out / "demo_fp32.onnx"), Bundle.load(out / "demo_fp16.onnx")
    assert (fp32.meta.precision, fp16.meta.precision) == ("fp32", "fp16") and fp16.meta.demo
    assert non_fp32_norms(fp16.load_onnx()) == []
    assert r.stdout.count("precision   fp32") == 1 and r.stdout.count("precision   fp16") == 1
    assert "export check fp16 random" in r.stderr  # verified against PyTorch at export


def test_bundles_refuses_an_unknown_source(tmp_path):
    r = sh("bundles.sh", tmp_path / "nothing", tmp_path / "out")
    assert r.returncode == 2 and "neither an nnU-Net model folder (with plans.json) nor a bundle file" in r.stderr
    r = sh("bundles.sh")
    assert r.returncode != 0 and "usage: export/bundles.sh SOURCE OUT_DIR [NAME]" in r.stderr


def test_bundles_refuses_existing_bundles_before_any_work(demo_nnunet_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "demo_fp16.onnx").write_bytes(b"an earlier bundle")  # the second of the two: nothing is made
    r = sh("bundles.sh", demo_nnunet_dir, out, "demo")
    assert r.returncode == 8 and f"{out}/demo_fp16.onnx exists; set FLARE_RT_OVERWRITE=1 to replace it" in r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["demo_fp16.onnx"]
    assert (out / "demo_fp16.onnx").read_bytes() == b"an earlier bundle"


def fake_gpu_env(tmp_path, gpu="Quadro RTX 5000", cc="7.5") -> dict:
    return {"PYTHONPATH": f"{FAKES}{os.pathsep}{REPO}", "FLARE_RT_CACHE": str(tmp_path / "cache"),
            "FAKE_GPU_NAME": gpu, "FAKE_GPU_CC": cc, "FAKE_TRT_VERSION": "10.16.1.11"}


def test_engine_for_a_named_gpu(tmp_path):
    from flare_rt.resources import packaged_model

    env = fake_gpu_env(tmp_path)
    r = sh("engine.sh", packaged_model(), "RTX 5000", 2, tmp_path / "ship", env=env)
    assert r.returncode == 0, r.stderr
    timing, engine = sorted(p.name for p in (tmp_path / "ship").iterdir())
    assert engine.startswith("ts_demo_small_fp16-fp16-b1-2-2-quadro-rtx-5000-sm75-trt10.16.1.11-")
    assert engine.endswith(".engine") and timing == "timing-quadro-rtx-5000-sm75-trt10.16.1.11.cache"
    assert (tmp_path / "cache" / "engines" / engine).is_file()  # and in the cache, where segment looks
    assert "key     fp16, batch 1/2/2, Quadro RTX 5000 (sm_75), TensorRT 10.16.1.11" in r.stdout
    wrong = sh("engine.sh", packaged_model(), "A100", 2, env=env)
    assert wrong.returncode == 4
    assert "this machine's GPU is Quadro RTX 5000 (sm_75), not 'A100'" in wrong.stderr


DOCKER = """#!/bin/sh
# docker double: records each call, one line per argument, calls separated by ---
{ for a in "$@"; do printf '%s\\n' "$a"; done; echo ---; } >> "$DOCKER_LOG"
if [ "$1" = run ] && [ -n "${FAKE_RUN_STATUS:-}" ]; then exit "$FAKE_RUN_STATUS"; fi
if [ "$1" = save ]; then printf 'image' > "$4"; fi
exit 0
"""


def docker_calls(log: Path) -> list[list[str]]:
    calls = log.read_text().split("---\n")
    return [c.splitlines() for c in calls if c.strip()]


@pytest.fixture
def docker(tmp_path):
    exe = tmp_path / "docker"
    exe.write_text(DOCKER)
    exe.chmod(0o755)
    return exe


def test_bake_builds_in_the_image_then_commits_and_saves(docker, tmp_path):
    log = tmp_path / "calls"
    r = sh("bake_engine.sh", "team:unbaked", "team:latest", "team.tar.gz", cwd=tmp_path,
           env={"DOCKER": str(docker), "DOCKER_LOG": str(log), "FLARE_RT_BATCH_SIZE": "4"})
    assert r.returncode == 0, r.stderr
    run, commit, save, rm = docker_calls(log)
    name = run[run.index("--name") + 1]
    assert run[:3] == ["run", "--gpus", "device=0"] and name.startswith("flare-rt-bake-")
    assert "FLARE_RT_BATCH_SIZE=4" in run and run[run.index("team:unbaked") + 1:][:2] == ["/bin/sh", "-c"]
    inner = "\n".join(run[run.index("-c") + 1:])  # the script run inside the container
    assert 'python3 -m flare_rt build-engine --batch-size "$FLARE_RT_BATCH_SIZE"' in inner
    assert "FLARE_RT_BACKEND=tensorrt" in inner and "FLARE_RT_ENGINE_BUILD=never sh /workspace/predict.sh" in inner
    assert commit == ["commit", "--change", 'CMD ["sh", "predict.sh"]', "--change", "WORKDIR /workspace", name,
                      "team:latest"]
    assert save == ["save", "team:latest", "-o", "team.tar.gz"] and (tmp_path / "team.tar.gz").is_file()
    assert rm == ["rm", "-f", name]  # the bake container is removed


def test_a_failed_bake_commits_nothing(docker, tmp_path):
    log = tmp_path / "calls"
    r = sh("bake_engine.sh", "team:unbaked", cwd=tmp_path,
           env={"DOCKER": str(docker), "DOCKER_LOG": str(log), "FAKE_RUN_STATUS": "4"})
    assert r.returncode == 4
    assert [c[0] for c in docker_calls(log)] == ["run", "rm"]
    assert not (tmp_path / "teamname.tar.gz").exists()
