"""Dataset index: FLARE23 and nnU-Net layouts, declared vs inferred annotations, geometry checks, splits."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from flare_rt.errors import ConfigError, InputImageError
from flare_rt.train.dataset import (DatasetIndex, build_index, index_from_pairs, load_index, save_index,
                                    split_cases)
from synthetic import flare_dataset, synthetic_case, write


@pytest.fixture(scope="module")
def flare(tmp_path_factory):
    root = flare_dataset(tmp_path_factory.mktemp("idx") / "FLARE", 3, partial={1: (1, 3)}, shape=(8, 24, 24))
    image, _ = synthetic_case(9, (8, 24, 24))
    write(root / "unlabeledTr" / "case_09_0000.nii.gz", image)
    return root


def test_flare_layout_with_unlabelled_cases_and_inferred_annotations(flare, tmp_path):
    index = build_index(flare, progress=False)
    assert index.layout == "flare23"
    assert [c.id for c in index.cases] == ["case_00", "case_01", "case_02", "case_09"]
    c0, c1, c9 = index.case("case_00"), index.case("case_01"), index.case("case_09")
    assert c0.shape == (8, 24, 24) and c0.spacing == pytest.approx((4.0, 2.4, 2.4))
    assert c0.annotated == (0, 1, 2, 3, 5) and c0.annotated_source == "inferred"
    assert c1.annotated == (0, 1, 3)
    assert not c9.labelled and c9.annotated == () and c9.annotated_source == "unlabelled"
    assert [c.id for c in index.labelled()] == ["case_00", "case_01", "case_02"]
    # the JSON round trip is exact
    path = save_index(index, tmp_path / "index.json")
    assert load_index(path) == index
    assert json.loads(path.read_text())["cases"][1]["annotated"] == [0, 1, 3]


def test_declared_annotations_and_overrides(flare):
    full = tuple(range(15))
    index = build_index(flare, annotations={"case_00": full}, progress=False)
    assert index.case("case_00").annotated == full and index.case("case_00").annotated_source == "declared"
    assert index.case("case_02").annotated_source == "inferred"
    over = index.with_annotations({"case_02": [1, 2, 3, 5, 14]})
    assert over.case("case_02").annotated == (0, 1, 2, 3, 5, 14)
    with pytest.raises(ConfigError, match=r"present but not declared"):
        index.with_annotations({"case_00": [1]})  # kidney and aorta are in its label map
    with pytest.raises(ConfigError, match="not in the index"):
        index.with_annotations({"nope": [1]})


def test_nnunet_raw_layout(tmp_path):
    root = flare_dataset(tmp_path / "Dataset001", 2, shape=(8, 24, 24))
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "file_ending": ".nii.gz",
                                                   "labels": {"background": 0, "liver": 1, "spleen": 3}}))
    index = build_index(root, progress=False)
    assert index.layout == "nnunet" and len(index.labelled()) == 2
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT", "1": "PET"}}))
    with pytest.raises(ConfigError, match="2 input channels"):
        build_index(root, progress=False)


def test_label_off_the_image_grid_is_rejected_with_a_fix(tmp_path):
    root = flare_dataset(tmp_path / "F", 1, shape=(8, 24, 24))
    lab = sitk.ReadImage(str(root / "labelsTr" / "case_00.nii.gz"))
    lab.SetOrigin((0.0, 30.0, 0.0))
    sitk.WriteImage(lab, str(root / "labelsTr" / "case_00.nii.gz"))
    with pytest.raises(InputImageError, match="Resample"):
        build_index(root, progress=False)


def test_pairs_dicom_and_errors(tmp_path):
    root = flare_dataset(tmp_path / "F", 2, shape=(8, 24, 24))
    img = root / "imagesTr" / "case_00_0000.nii.gz"
    index = index_from_pairs([("a", img, root / "labelsTr" / "case_00.nii.gz"), ("b", img, None)])
    assert index.layout == "pairs" and index.case("b").annotated == ()
    with pytest.raises(ConfigError, match="no images"):
        shutil.rmtree(root / "imagesTr")
        (root / "imagesTr").mkdir()
        build_index(root, progress=False)
    with pytest.raises(ConfigError, match="not found"):
        build_index(tmp_path / "missing", progress=False)


def test_split_cases():
    from flare_rt.train.dataset import CaseEntry

    def entry(i, labelled=True):
        return CaseEntry(f"c{i}", "img", "lab" if labelled else None, (1, 1, 1), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0),
                         (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0), (0, 1), (0, 1) if labelled else (), "inferred")

    index = DatasetIndex(tuple(entry(i) for i in range(10)) + (entry(10, False),), "x", "pairs", {})
    train, val = split_cases(index, val_fraction=0.2, seed=0)
    assert len(val) == 2 and len(train) == 8 and not set(train) & set(val) and "c10" not in train
    assert split_cases(index, val_fraction=0.2, seed=0) == (train, val)  # seeded
    assert split_cases(index, val_cases=("c3",)) == (tuple(f"c{i}" for i in range(10) if i != 3), ("c3",))
    assert split_cases(index, train_cases=("c1",), val_cases=("c1",)) == (("c1",), ("c1",))
    with pytest.raises(ConfigError, match="no label"):
        split_cases(index, val_cases=("c10",))
    with pytest.raises(ConfigError, match="not in the dataset index"):
        split_cases(index, val_cases=("zz",))
    np.testing.assert_equal(len(split_cases(index, val_fraction=0.0)[1]), 10)  # no hold-out: validate on train
