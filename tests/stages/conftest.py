"""Fixtures of the pipeline tests: the training tests' one-thread setting, and a generated FLARE23-layout
dataset with fully, partially and un-labelled cases."""
from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
TRAIN_TESTS = Path(__file__).resolve().parents[1] / "train"
sys.path.insert(0, str(TRAIN_TESTS))  # the generated-case helpers

from synthetic import flare_dataset  # noqa: E402

_spec = importlib.util.spec_from_file_location("_train_test_fixtures", TRAIN_TESTS / "conftest.py")
_train_fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_train_fixtures)
_one_thread = _train_fixtures._one_thread  # autouse: one torch thread, as in the training tests


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> Path:
    """case_00, case_01: liver, right kidney, spleen, aorta; case_02: liver and spleen only; case_03: no label
    (the image of another generated case, in unlabeledTr)."""
    root = flare_dataset(tmp_path_factory.mktemp("pipeline") / "FLARE23", 3, partial={2: (1, 3)})
    other = flare_dataset(root.parent / "extra", 4)
    (root / "unlabeledTr").mkdir()
    shutil.copy(other / "imagesTr" / "case_03_0000.nii.gz", root / "unlabeledTr" / "case_03_0000.nii.gz")
    return root
