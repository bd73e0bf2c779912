"""Classes that no training case annotates are learnt as absent (nnU-Net's network has no output for them);
classes some cases annotate stay unannotated (marginal) in the others."""
from __future__ import annotations

import pytest
import torch

from flare_rt.train import LossConfig
from flare_rt.train.loss import dice_ce
from flare_rt.train.prepare import prepare
from synthetic import tiny_config

NEVER = (4, 6, 7, 8, 9, 10, 11, 12, 13, 14)  # the synthetic cases annotate liver, right kidney, spleen, aorta


def test_never_annotated_classes_are_annotated_absent_in_every_case(synthetic_root, tmp_path):
    cfg = tiny_config(synthetic_root, tmp_path / "run")  # trains on case_00 (1, 2, 3, 5) and case_02 (1, 3)
    prepared = prepare(cfg, progress=False)
    assert prepared.absent == NEVER
    cases = {i: a for i, a, _ in prepared.cases(prepared.train_ids)}
    assert cases["case_02"] == tuple(sorted((0, 1, 3, *NEVER)))  # 2 and 5: annotated elsewhere, marginal here
    assert cases["case_00"] == tuple(sorted((0, 1, 2, 3, 5, *NEVER)))
    off = prepare(cfg.with_(loss=LossConfig(never_annotated_absent=False)), progress=False)
    assert off.absent == () and {i: a for i, a, _ in off.cases(off.train_ids)}["case_02"] == (0, 1, 3)


def test_an_absent_class_is_pushed_down_where_an_unannotated_one_is_not():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 15, 4, 6, 6, generator=g, dtype=torch.float64)
    target = torch.randint(0, 2, (1, 1, 4, 6, 6), generator=g) * 3  # background and spleen
    marginal = torch.zeros(1, 15, dtype=torch.bool)
    marginal[0, [0, 1, 3]] = True
    absent = marginal.clone()
    absent[0, 14] = True
    more_tumour = logits.clone()  # 90 % of the background-or-tumour mass moved to the tumour
    m = torch.logsumexp(torch.stack([logits[0, 0], logits[0, 14]]), 0)
    more_tumour[0, 0], more_tumour[0, 14] = m + torch.log(torch.tensor(0.1, dtype=torch.float64)), \
        m + torch.log(torch.tensor(0.9, dtype=torch.float64))
    cfg = LossConfig()
    # unannotated: the tumour output may take background's mass for free; absent: it costs
    assert dice_ce(more_tumour, target, marginal, cfg).item() == pytest.approx(
        dice_ce(logits, target, marginal, cfg).item(), abs=1e-12)
    assert dice_ce(more_tumour, target, absent, cfg).item() > dice_ce(logits, target, absent, cfg).item() + 0.01
