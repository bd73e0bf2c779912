"""Two processes under torchrun (gloo on the CPU): DistributedDataParallel keeps their weights identical
although each rank trains on its own patches."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from flare_rt.train import ScheduleConfig, prepare, save_config
from flare_rt.train.config import TinyModel
from flare_rt.train.model import init_network
from synthetic import tiny_config

REPO = Path(__file__).resolve().parents[2]


def test_two_ranks_end_with_identical_weights(synthetic_root, tmp_path):
    out = tmp_path / "ddp"
    cfg = tiny_config(synthetic_root, out, schedule=ScheduleConfig(epochs=2, iterations_per_epoch=3, val_iterations=2,
                                                                     checkpoint_every=1))
    prepare(cfg, progress=False)  # the cache exists before the ranks start
    path = save_config(cfg, tmp_path / "ddp.json")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(Path(__file__).with_name("ddp_worker.py")), str(path), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    w0, w1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert set(w0) == set(w1)
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    init = init_network(TinyModel(), 15, seed=0).state_dict()
    unchanged = sorted(k for k in w0 if w0[k].is_floating_point() and torch.equal(w0[k], init[k]))
    # every weight trained; only zero-initialised biases without gradient may keep their init (conv biases that
    # InstanceNorm cancels, the deepest supervision head whose loss weight is 0, as nnU-Net's)
    assert all(k.endswith(".bias") and not init[k].any() for k in unchanged), unchanged
    l0, l1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert len(l0) == len(l1) == 6
    assert l0 != l1  # on different patches: equal weights come from the gradient all-reduce
    assert (out / "checkpoint_final.pt").is_file() and (out / "progress.csv").is_file()
