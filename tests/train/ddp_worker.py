"""Run by test_ddp.py under torchrun: train CONFIG, then save this rank's weights and its own losses."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from flare_rt.train import load_config, train

if __name__ == "__main__":
    torch.set_num_threads(1)
    config, out = load_config(sys.argv[1]), Path(sys.argv[2])
    result = train(config)
    torch.save(result.model.state_dict(), out / f"rank{result.rank}.pt")
    losses = [x for record in result.history for x in record.iteration_losses]
    (out / f"rank{result.rank}.json").write_text(json.dumps(losses))
