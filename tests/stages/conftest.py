"""Fixtures of the pipeline tests: one torch thread, and a generated FLARE23-layout dataset with fully,
partially and un-labelled cases."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))  # the generated-case helpers

from synthetic import flare_dataset  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    before, env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    torch.set_num_threads(before)
    if env is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = env


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> Path:
    """case_00, case_01: liver, right kidney, spleen, aorta; case_02: liver and spleen only; case_03: no label
    (the image of another generated case, in unlabeledTr)."""
    root = flare_dataset(tmp_path_factory.mktemp("pipeline") / "FLARE23", 3, partial={2: (1, 3)})
    other = flare_dataset(root.parent / "extra", 4)
    (root / "unlabeledTr").mkdir()
    shutil.copy(other / "imagesTr" / "case_03_0000.nii.gz", root / "unlabeledTr" / "case_03_0000.nii.gz")
    return root
