"""docker/check_image.sh, under dash, against a docker double: it runs the organisers' command, and fails
on a predict.sh failure, a missing output, or a write into the container's own filesystem (`docker diff`),
telling a run-time cache write (the image is not baked) from a write elsewhere. The script also ran for
real against an image built here (the closing note of issue 10)."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "docker" / "check_image.sh"

DOCKER = """#!/bin/sh
# docker double: records each call (one line per argument, calls separated by ---); `container run` writes
# <case>.nii.gz into the outputs mount for each <case>_0000.nii.gz of the inputs mount except those named in
# FAKE_FAIL_CASES and exits FAKE_RUN_STATUS; `diff` prints FAKE_DIFF
{ for a in "$@"; do printf '%s\\n' "$a"; done; echo ---; } >> "$DOCKER_LOG"
case "$1" in
container)
    inputs= outputs=
    while [ "$#" -gt 0 ]; do
        case "$1" in
        -v) case "$2" in
            *:/workspace/inputs) inputs=${2%:/workspace/inputs} ;;
            *:/workspace/outputs) outputs=${2%:/workspace/outputs} ;;
            esac
            shift ;;
        esac
        shift
    done
    for f in "$inputs"/*_0000.nii.gz; do
        c=${f##*/}; c=${c%_0000.nii.gz}
        case " ${FAKE_FAIL_CASES:-} " in *" $c "*) continue ;; esac
        printf 'labels' > "$outputs/$c.nii.gz"
    done
    [ -z "${FAKE_RUN_SLEEP:-}" ] || sleep "$FAKE_RUN_SLEEP"
    exit "${FAKE_RUN_STATUS:-0}" ;;
diff) [ -z "${FAKE_DIFF:-}" ] || printf '%s\\n' "$FAKE_DIFF" ;;
esac
exit 0
"""


@pytest.fixture
def setup(tmp_path):
    exe = tmp_path / "docker"
    exe.write_text(DOCKER)
    exe.chmod(0o755)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for case in ("p1", "p2"):
        (inputs / f"{case}_0000.nii.gz").write_bytes(b"ct")
    return exe, inputs, tmp_path


def check(setup, *args, **env) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    exe, inputs, tmp = setup
    dash = shutil.which("dash")
    assert dash, "dash is not installed (apt-get install dash)"
    log = tmp / "calls"
    log.unlink(missing_ok=True)
    full = {**os.environ, "DOCKER": str(exe), "DOCKER_LOG": str(log), "CHECK_OUTPUTS": str(tmp / "outputs"),
            "TMPDIR": str(tmp), **env}
    r = subprocess.run([dash, str(SCRIPT), *map(str, args or ("team:latest", inputs))], env=full,
                       capture_output=True, text=True, timeout=60, check=False)
    calls = [c.splitlines() for c in log.read_text().split("---\n") if c.strip()] if log.exists() else []
    return r, calls


def test_a_clean_run_passes_and_runs_the_organisers_command(setup):
    _, inputs, tmp = setup
    r, calls = check(setup)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "check: predict.sh exited 0" in r.stdout and r.stdout.rstrip().endswith("check: passed")
    run, diff, rm = calls
    name = run[run.index("--name") + 1]
    assert run == ["container", "run", "--gpus", "device=0", "--name", name,
                   "-v", f"{inputs}:/workspace/inputs", "-v", f"{tmp / 'outputs'}:/workspace/outputs",
                   "team:latest", "/bin/bash", "-c", "sh predict.sh"]
    assert diff == ["diff", name] and rm == ["rm", "-f", name]
    assert sorted(p.name for p in (tmp / "outputs").iterdir()) == ["p1.nii.gz", "p2.nii.gz"]


def test_without_a_gpu(setup):
    r, calls = check(setup, CHECK_GPU="none")
    assert r.returncode == 0, r.stderr
    assert "--gpus" not in calls[0]


NVIDIA_SMI = """#!/bin/sh
# nvidia-smi double: `--query-gpu=memory.total,memory.free ... -i N` answers "total, free" in MiB: 16000 free
# on the first query, 13000 on every later one; each call is recorded
echo "$*" >> "$SMI_LOG"
if [ -s "$SMI_LOG.n" ]; then echo "16384, 13000"; else echo 1 > "$SMI_LOG.n"; echo "16384, 16000"; fi
"""


def test_gpu_memory_is_sampled_as_the_challenge_does(setup):
    _, _, tmp = setup
    smi = tmp / "nvidia-smi"
    smi.write_text(NVIDIA_SMI)
    smi.chmod(0o755)
    r, _ = check(setup, NVIDIA_SMI=str(smi), SMI_LOG=str(tmp / "smi"), FAKE_RUN_SLEEP="0.6", CHECK_GPU="1")
    assert r.returncode == 0, r.stderr
    queries = (tmp / "smi").read_text().splitlines()
    assert len(queries) >= 3 and set(queries) == {"--query-gpu=memory.total,memory.free --format=csv,noheader,"
                                                  "nounits -i 1"}
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("check: GPU 1 memory"))
    n = int(line.rsplit("(", 1)[1].split()[0])  # used: 384 MiB, then 3384 MiB for every later sample
    assert n >= 3 and line.endswith(f"max 3384 MiB, AUC {round((384 + 3384 * (n - 1)) * 0.1)} MiB*s ({n} samples)")
    assert not (tmp / "outputs.gpu-samples").exists()
    none, _ = check(setup, NVIDIA_SMI=str(smi), SMI_LOG=str(tmp / "smi-none"), CHECK_GPU="none")
    assert "GPU" not in none.stdout.replace("(GPU none)", "") and not (tmp / "smi-none").exists()
    missing, _ = check(setup, NVIDIA_SMI=str(tmp / "absent"))
    assert missing.returncode == 0 and "GPU memory not sampled" in missing.stderr


def test_a_failed_case_fails_the_check_and_is_named(setup):
    r, _ = check(setup, FAKE_FAIL_CASES="p2", FAKE_RUN_STATUS="1")
    assert r.returncode == 1
    assert "check: predict.sh exited 1" in r.stdout and "check: no output for: p2" in r.stderr
    assert "check: FAILED" in r.stderr


def test_writes_in_the_container_are_told_apart(setup):
    diff = "\n".join(["C /opt", "C /opt/flare-rt", "C /opt/flare-rt/cache", "A /opt/flare-rt/cache/engines/x.engine",
                      "C /root", "A /root/.cache"])
    r, _ = check(setup, FAKE_DIFF=diff)
    assert r.returncode == 1
    err = r.stderr.splitlines()
    cache = err.index("check: the run wrote into the image's cache (not baked for this GPU: export/bake_engine.sh):")
    elsewhere = err.index("check: the run wrote outside /workspace/outputs:")
    assert err[cache + 1:elsewhere] == ["  C /opt/flare-rt/cache", "  A /opt/flare-rt/cache/engines/x.engine"]
    assert err[elsewhere + 1:elsewhere + 3] == ["  C /root", "  A /root/.cache"]
    only_cache, _ = check(setup, FAKE_DIFF="C /opt\nC /opt/flare-rt\nA /opt/flare-rt/cache")
    assert only_cache.returncode == 1 and "outside" not in only_cache.stderr


def test_usage(setup):
    _, _, tmp = setup
    r, calls = check(setup, "team:latest")
    assert r.returncode == 2 and "usage: docker/check_image.sh IMAGE INPUTS" in r.stderr and not calls
    r, calls = check(setup, "team:latest", tmp / "absent")
    assert r.returncode == 2 and "is not a folder" in r.stderr and not calls
