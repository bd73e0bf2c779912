"""The training loop: a crashed run resumes bit-identically, logs and checkpoints are written, guards hold."""
from __future__ import annotations

import csv
import math
from dataclasses import replace

import pytest
import torch

from synthetic import tiny_config
from flare_rt.errors import ConfigError
from flare_rt.train import ScheduleConfig, train
from flare_rt.train.checkpoint import FINAL, LATEST, load_checkpoint
from flare_rt.train.config import TinyModel
from flare_rt.train.loop import poly_lr
from flare_rt.train.model import he_init, init_network


class Crash(RuntimeError):
    pass


def crash_after(epoch: int):
    def callback(record):
        if record.epoch == epoch:
            raise Crash(f"simulated crash after epoch {epoch}")
    return callback


def test_resume_after_a_crash_reproduces_the_uninterrupted_run(synthetic_root, tmp_path):
    schedule = ScheduleConfig(epochs=3, iterations_per_epoch=3, val_iterations=1, checkpoint_every=1)
    whole = train(tiny_config(synthetic_root, tmp_path / "whole", schedule=schedule))
    cfg = tiny_config(synthetic_root, tmp_path / "crashed", schedule=schedule)
    with pytest.raises(Crash):
        train(cfg, callbacks=[crash_after(1)])
    assert load_checkpoint(tmp_path / "crashed" / LATEST)["epoch"] == 1
    more_workers = cfg.with_(runtime=replace(cfg.runtime, num_workers=1))
    resumed = train(more_workers, resume=True)  # the loader's workers do not change the batches

    losses = lambda r: [x for rec in r.history for x in rec.iteration_losses]  # noqa: E731
    assert len(losses(whole)) == 9 and all(math.isfinite(x) for x in losses(whole))
    assert losses(resumed) == losses(whole)  # bit-identical on the CPU
    assert [r.val_loss for r in resumed.history] == [r.val_loss for r in whole.history]
    assert [r.lr for r in resumed.history] == [r.lr for r in whole.history]
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # ...and training did something: the weights moved from their initialisation
    init = init_network(TinyModel(), 15, seed=0).state_dict()
    assert not all(torch.equal(a[k], init[k]) for k in a)


def test_outputs_logs_and_guards(synthetic_root, tmp_path):
    from flare_rt.train import LossConfig

    # classes no case annotates left unannotated (not learnt as absent), so validation skips them
    cfg = tiny_config(synthetic_root, tmp_path / "run", loss=LossConfig(never_annotated_absent=False))
    result = train(cfg)
    out = tmp_path / "run"
    for name in ("config.json", "progress.csv", "progress.png", LATEST, FINAL):
        assert (out / name).is_file(), name
    rows = list(csv.DictReader(open(out / "progress.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert {"train_loss", "val_loss", "mean_fg_dice", "dice_liver", "dice_spleen", "data_seconds"} <= set(rows[0])
    ckpt = load_checkpoint(out / FINAL)
    assert ckpt["epoch"] == 2 and ckpt["iteration"] == 4 and {"torch", "numpy", "python"} <= set(ckpt["rng"])
    assert result.bundle is None and result.checkpoint == out / FINAL
    # validation covers the classes the validation case annotates, and only those
    dice = result.history[-1].val_dice
    assert not math.isnan(dice[1]) and math.isnan(dice[4])  # liver annotated, pancreas not

    with pytest.raises(ConfigError, match="resume"):
        train(cfg)  # a finished run is not silently overwritten
    changed = tiny_config(synthetic_root, tmp_path / "run", schedule=ScheduleConfig(epochs=3, iterations_per_epoch=2,
                                                                                     val_iterations=1),
                          loss=LossConfig(never_annotated_absent=False))
    with pytest.raises(ConfigError, match="different configuration"):
        train(changed, resume=True)


def test_without_deep_supervision(synthetic_root, tmp_path):
    from flare_rt.train import LossConfig

    cfg = tiny_config(synthetic_root, tmp_path / "plain", loss=LossConfig(deep_supervision=False, marginal=False),
                      schedule=ScheduleConfig(epochs=1, iterations_per_epoch=2, val_iterations=1))
    result = train(cfg)
    assert not result.model.cfg.deep_supervision and math.isfinite(result.history[0].train_loss)


def test_he_initialisation_and_poly_schedule():
    net = he_init(init_network(TinyModel(), 15, seed=1), 1e-2)
    conv = net.encoder.stages[1][0].convs[0].conv
    fan_in = conv.weight[0].numel()
    expected = math.sqrt(2 / (1 + 1e-4) / fan_in)
    assert conv.weight.std().item() == pytest.approx(expected, rel=0.1)
    assert all(m.bias.abs().sum() == 0 for m in net.modules() if isinstance(m, (torch.nn.Conv3d,
                                                                                  torch.nn.ConvTranspose3d)))
    assert poly_lr(0.01, 0, 1000, 0.9) == 0.01
    assert poly_lr(0.01, 500, 1000, 0.9) == pytest.approx(0.01 * 0.5 ** 0.9)
    a = init_network(TinyModel(), 15, seed=3).state_dict()
    b = init_network(TinyModel(), 15, seed=3).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
