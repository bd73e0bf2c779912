"""The training log: one record per epoch, written as CSV and rendered as a PNG (loss and Dice curves)."""
from __future__ import annotations

import csv
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from ..atomic import atomic_path


@dataclass(frozen=True)
class EpochRecord:
    epoch: int  # 1-based
    lr: float
    train_loss: float
    val_loss: float  # NaN when not validated this epoch
    val_dice: tuple[float, ...]  # per class (background first); NaN where unseen
    seconds: float
    data_seconds: float  # waiting for batches
    step_seconds: float  # augmentation + forward + backward + optimiser step
    iteration_losses: tuple[float, ...] = field(default=(), repr=False)

    @property
    def mean_foreground_dice(self) -> float:
        vals = [d for d in self.val_dice[1:] if not math.isnan(d)]
        return sum(vals) / len(vals) if vals else math.nan

    def to_dict(self) -> dict:
        d = asdict(self)
        d["val_dice"], d["iteration_losses"] = list(self.val_dice), list(self.iteration_losses)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "EpochRecord":
        d = dict(d)
        d["val_dice"], d["iteration_losses"] = tuple(d["val_dice"]), tuple(d.get("iteration_losses", ()))
        return cls(**d)


def write_csv(history: Sequence[EpochRecord], labels: Mapping[int, str], path: str | Path) -> Path:
    path = Path(path)
    names = [labels[k] for k in sorted(labels)][1:]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["epoch", "lr", "train_loss", "val_loss", "mean_fg_dice", *[f"dice_{n}" for n in names],
                    "seconds", "data_seconds", "step_seconds"])
        for r in history:
            w.writerow([r.epoch, f"{r.lr:.6g}", f"{r.train_loss:.6f}", f"{r.val_loss:.6f}",
                        f"{r.mean_foreground_dice:.4f}", *[f"{d:.4f}" for d in r.val_dice[1:]],
                        f"{r.seconds:.2f}", f"{r.data_seconds:.2f}", f"{r.step_seconds:.2f}"])
    return path


def plot(history: Sequence[EpochRecord], labels: Mapping[int, str], path: str | Path) -> Path:
    """Loss curves (top) and validation Dice per class with the foreground mean (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    epochs = [r.epoch for r in history]
    fig, (a, b) = plt.subplots(2, 1, figsize=(9, 8), sharex=True)
    a.plot(epochs, [r.train_loss for r in history], label="train loss")
    a.plot(epochs, [r.val_loss for r in history], label="val loss")
    a.set_ylabel("loss (CE - Dice)")
    a.legend()
    a.grid(alpha=0.3)
    for k in sorted(labels)[1:]:
        vals = [r.val_dice[k] if k < len(r.val_dice) else math.nan for r in history]
        if any(not math.isnan(v) for v in vals):
            b.plot(epochs, vals, lw=0.8, alpha=0.7, label=labels[k])
    b.plot(epochs, [r.mean_foreground_dice for r in history], "k", lw=2, label="mean")
    b.set_xlabel("epoch")
    b.set_ylabel("validation Dice (patches)")
    b.set_ylim(0, 1)
    b.grid(alpha=0.3)
    b.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)
    return path
