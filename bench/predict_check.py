"""The challenge entry point (``predict.sh``) on this machine's GPU, outside Docker: a folder of real cases
and one corrupt case, ``sh predict.sh`` with the image's environment variables, then the outputs checked.

    python bench/predict_check.py DATA_DIR WORK_DIR [--backend torch] [--device cuda] [--timeout 90]

DATA_DIR holds ``ts_example_ct.nii.gz`` and ``ts_example_ct_sm.nii.gz`` (``python bench/cases.py data DIR``).
Passes (exit 0) when predict.sh exits 1 (not all cases succeeded), both good cases are written as uint8
labels on their input's grid with more than the background in them, and the corrupt case has no output.
Reads with nibabel (no SimpleITK on the GPU machine). The GPU check runs it on the device; its dry run runs
it with the CPU backend.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GOOD = {"caseA": "ts_example_ct.nii.gz", "caseB": "ts_example_ct_sm.nii.gz"}
BAD = "caseC"


def prepare(data: Path, work: Path) -> tuple[Path, Path]:
    """``work/inputs`` with the good cases and a truncated copy of one (a corrupt gzip), empty ``work/outputs``."""
    shutil.rmtree(work, ignore_errors=True)
    inputs, outputs = work / "inputs", work / "outputs"
    inputs.mkdir(parents=True)
    for case, name in GOOD.items():
        shutil.copyfile(data / name, inputs / f"{case}_0000.nii.gz")
    (inputs / f"{BAD}_0000.nii.gz").write_bytes((data / GOOD["caseA"]).read_bytes()[:5000])
    return inputs, outputs


def check(inputs: Path, outputs: Path, returncode: int) -> list[str]:
    """What is wrong with a finished run (empty: all as expected)."""
    import nibabel as nib
    import numpy as np

    problems = []
    if returncode != 1:
        problems.append(f"predict.sh exited {returncode}, expected 1 (one corrupt case)")
    written = sorted(p.name for p in outputs.glob("*.nii.gz"))
    expected = sorted(f"{c}.nii.gz" for c in GOOD)
    if written != expected:
        problems.append(f"outputs {written}, expected {expected}")
    for case in GOOD:
        out = outputs / f"{case}.nii.gz"
        if not out.is_file():
            continue
        src, lab = nib.load(str(inputs / f"{case}_0000.nii.gz")), nib.load(str(out))
        labels = np.asarray(lab.dataobj)
        if lab.shape != src.shape or not np.allclose(lab.affine, src.affine, atol=1e-4):
            problems.append(f"{out.name}: grid {lab.shape} / affine differs from its input's {src.shape}")
        if labels.dtype != np.uint8:
            problems.append(f"{out.name}: dtype {labels.dtype}, expected uint8")
        if len(np.unique(labels)) < 3:
            problems.append(f"{out.name}: labels {np.unique(labels).tolist()}: not a segmentation")
    return problems


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", type=Path)
    p.add_argument("work", type=Path)
    p.add_argument("--backend", default="torch")
    p.add_argument("--device", default="cuda")
    p.add_argument("--timeout", type=float, default=90.0)
    args = p.parse_args(argv)
    inputs, outputs = prepare(args.data, args.work)
    env = {**os.environ, "FLARE_RT_INPUTS": str(inputs), "FLARE_RT_OUTPUTS": str(outputs),
           "FLARE_RT_BACKEND": args.backend, "FLARE_RT_DEVICE": args.device, "FLARE_RT_PYTHON": sys.executable,
           "FLARE_RT_CACHE": str(args.work / "cache"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    t0 = time.perf_counter()
    run = subprocess.run(["sh", str(REPO / "predict.sh")], env=env, cwd=args.work, capture_output=True, text=True,
                         timeout=args.timeout)
    wall = time.perf_counter() - t0
    sys.stdout.write(run.stdout[-3000:] + run.stderr[-3000:])
    problems = check(inputs, outputs, run.returncode)
    verdict = "ok" if not problems else "FAILED: " + "; ".join(problems)
    sys.stdout.write(f"predict.sh ({args.backend} on {args.device}): exit {run.returncode} in {wall:.1f} s, "
                     f"outputs {sorted(p.name for p in outputs.glob('*.nii.gz'))}: {verdict}\n")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
