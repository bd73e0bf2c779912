"""Fixtures of the training tests: one torch thread, real data located beside the repository, and a
generated FLARE23-layout dataset prepared once per session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="the training tests need PyTorch (pip install -e '.[dev]')")



@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Deterministic, and gentle with the machine: one intra-op thread in the training tests (and in the
    processes they start); restored afterwards for the rest of the suite."""
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
def real_data(shared_data) -> Path:
    return shared_data


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """Three generated cases in the FLARE23 layout; case 2 annotates liver and spleen only."""
    from synthetic import flare_dataset

    return flare_dataset(tmp_path_factory.mktemp("synthetic") / "FLARE23", 3, partial={2: (1, 3)})
