"""Tests of the benchmark tooling in ``bench/`` (scripts, not a package): put that folder on the path."""
from __future__ import annotations

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))


import pytest  # noqa: E402

#: A crop of the example CT small enough for whole-process runs of every system in seconds: at the demo
#: model's 4×1.2×1.2 mm it is 9×150×150 voxels, two 32×128×192 tiles.
TINY_CROP = (slice(30, 90), slice(20, 80), slice(50, 62))  # x, y, z of the stored array


@pytest.fixture(scope="session")
def tiny_ct(tmp_path_factory, example_ct_path):
    import nibabel as nib
    import numpy as np

    img = nib.load(str(example_ct_path))
    data = np.asarray(img.dataobj)[TINY_CROP]
    affine = img.affine.copy()
    affine[:3, 3] = img.affine[:3, :3] @ [s.start for s in TINY_CROP] + img.affine[:3, 3]
    path = tmp_path_factory.mktemp("tiny") / "tiny_ct.nii.gz"
    nib.save(nib.Nifti1Image(data.astype(np.int16), affine), str(path))
    return path
