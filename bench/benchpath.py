"""Imported first by the bench/ scripts: puts bench/ and the checkout's root on ``sys.path`` so that
``flare_rt`` is this tree's (not an installed copy) and the bench modules import each other."""
from __future__ import annotations

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
for _p in (str(BENCH), str(REPO)):
    if _p not in sys.path:
        sys.path.insert(0, _p)
