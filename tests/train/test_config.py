"""Config: the paper's values as defaults, JSON round trips, overrides and errors that name the fix."""
from __future__ import annotations

import json

import pytest

from flare_rt.errors import ConfigError, ModelError
from flare_rt.nets.unet import UNet
from flare_rt.train.config import (AugmentConfig, BigModel, DataConfig, ModelConfig, OptimConfig, ScheduleConfig,
                                   SmallModel, TinyModel, TrainConfig, apply_overrides, config_from_dict,
                                   load_config, preset_path, save_config)


def test_paper_values():
    big, small = BigModel(), SmallModel()
    assert big.features_per_stage[0] == 32 and len(big.features_per_stage) == 6  # 5 downsamplings
    assert set(big.n_conv_per_stage) == {3} and big.spacing == (2.5, 0.8, 0.8) and big.patch_size == (48, 224, 224)
    assert big.tta and not small.tta
    assert small.features_per_stage[0] == 16 and len(small.features_per_stage) == 5  # 4 downsamplings
    assert set(small.n_conv_per_stage) == {2} and small.spacing == (4.0, 1.2, 1.2)
    assert small.patch_size == (32, 128, 192)
    o, s = OptimConfig(), ScheduleConfig()
    assert (o.lr, o.momentum, o.nesterov, o.poly_exponent, o.grad_clip) == (0.01, 0.99, True, 0.9, 12.0)
    assert (s.batch_size, s.epochs) == (2, 1000) and s.oversample_foreground == pytest.approx(1 / 3)
    tiny = TinyModel()
    assert tiny.features_per_stage == (8, 16, 32) and tiny.patch_size == (16, 64, 64)
    assert tiny.spacing == (4.0, 2.4, 2.4) and tiny.orientation == "none"
    n_params = sum(p.numel() for p in UNet(small.unet(15)).parameters())
    assert 5.0e6 < n_params < 6.0e6  # paper Table 5: 5.4M


def test_deep_supervision_shapes_follow_the_strides():
    assert TinyModel().output_shapes() == [(16, 64, 64), (16, 32, 32)]
    assert SmallModel().downsampling() == (16, 16, 16)


def test_json_round_trip_and_relative_paths(tmp_path):
    cfg = TrainConfig(name="t", model=SmallModel(), data=DataConfig(dataset="/data/F", val_cases=("a", "b")),
                      output="/runs/t", augment=AugmentConfig(rotation_deg=(10.0, 20.0, 30.0)))
    path = save_config(cfg, tmp_path / "c.json")
    assert load_config(path) == cfg
    (tmp_path / "rel.json").write_text(json.dumps({"name": "r", "model": {"preset": "tiny", "patch_size": [16, 32, 32]},
                                                   "data": {"dataset": "ds"}, "output": "out"}))
    rel = load_config(tmp_path / "rel.json", ["schedule.epochs=3", "runtime.device=cpu"])
    assert rel.data.dataset == str((tmp_path / "ds").resolve()) and rel.output == str((tmp_path / "out").resolve())
    assert rel.model == TinyModel(patch_size=(16, 32, 32)) and rel.schedule.epochs == 3
    assert rel.runtime.device == "cpu"


def test_packaged_presets_load_with_a_dataset_and_output(tmp_path):
    for name, cls in (("big", BigModel), ("small", SmallModel), ("tiny", TinyModel)):
        cfg = load_config(preset_path(name), [f"data.dataset={tmp_path}", f"output={tmp_path / name}"])
        assert type(cfg.model) is cls and cfg.name == name
    with pytest.raises(ConfigError, match="--dataset"):
        load_config(preset_path("small"), [f"output={tmp_path}"])
    with pytest.raises(ConfigError, match="available"):
        preset_path("huge")


@pytest.mark.parametrize("change,match", [
    ({"model": {"preset": "tiny", "patch_size": [16, 62, 64]}}, r"not divisible .* use e.g. \(16, 64, 64\)"),
    ({"model": {"preset": "giant"}}, "preset must be one of"),
    ({"model": {"preset": "tiny", "orientation": "XYZ"}}, "orientation"),
    ({"schedule": {"epochs": 0}}, "epochs must be >= 1"),
    ({"schedule": {"epoch": 10}}, "unknown keys"),
    ({"augment": {"p_rotation": 2}}, r"\[0, 1\]"),
    ({"runtime": {"device": "tpu"}}, "auto, cpu or cuda"),
    ({"optim": {"lr": 0}}, "lr > 0"),
])
def test_bad_values_are_typed_errors_with_the_value(change, match):
    d = {"name": "x", "model": {"preset": "tiny"}, "data": {"dataset": "/d"}, "output": "/o", **change}
    with pytest.raises(ConfigError, match=match):
        config_from_dict(d)


def test_inconsistent_network_and_overrides():
    with pytest.raises(ModelError, match="inconsistent"):
        ModelConfig(features_per_stage=(8, 16), kernel_sizes=((3, 3, 3),) * 3, strides=((1, 1, 1),) * 3,
                    n_conv_per_stage=(2, 2), n_conv_per_stage_decoder=(2,), spacing=(1.0, 1.0, 1.0),
                    patch_size=(8, 8, 8), tta=False)
    assert apply_overrides({"a": {"b": 1}}, ["a.b=2", "a.c=[1, 2]", "name=run"]) == {"a": {"b": 2, "c": [1, 2]},
                                                                                       "name": "run"}
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        apply_overrides({}, ["epochs"])
    with pytest.raises(ConfigError, match="needs 'dataset'"):
        DataConfig()
