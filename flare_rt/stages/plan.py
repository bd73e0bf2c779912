"""A stage's training config, built from its model (preset or JSON), the definition's defaults, its own
overrides and its budget; and the part of that config a stage's content hash covers."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from ..errors import ConfigError
from ..train.config import TrainConfig, apply_overrides, config_from_dict, preset_path
from .definition import PipelineDefinition, StageDef

#: Paths of a training config: where things are, not what is trained (the hash covers file contents).
PATH_KEYS = {"data": ("dataset", "index", "cache", "annotations")}


def model_config_dict(definition: PipelineDefinition, stage: StageDef) -> dict[str, Any]:
    """The stage's base training config as a dict: a packaged preset or a JSON file."""
    path = Path(stage.model)
    if not path.is_absolute():
        path = Path(definition.base_dir) / path
    if not path.is_file():
        if stage.model.endswith(".json"):
            raise ConfigError(f"stage {stage.name!r}: model config {path} not found")
        path = preset_path(stage.model)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from exc


def stage_config(definition: PipelineDefinition, stage: StageDef, index: Path, output: Path,
                 init_weights: Path | None = None, run_overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """The :class:`TrainConfig` of ``stage``: model config < defaults < stage overrides < budget < the
    run's own (execution-only) overrides; data from ``index``, outputs in ``output``."""
    d = model_config_dict(definition, stage)
    values = {**dict(definition.defaults), **dict(stage.overrides),
              **(stage.budget.overrides() if stage.budget else {}), **dict(run_overrides or {})}
    d = apply_overrides(d, [f"{k}={json.dumps(v)}" for k, v in values.items()])
    d["name"] = f"{definition.name}-{stage.name}"
    d["output"] = str(output)
    d["init_weights"] = None if init_weights is None else str(init_weights)
    d["data"] = {**d.get("data", {}), "dataset": None, "index": str(index), "cache": None, "annotations": None}
    try:
        return config_from_dict(d)
    except ConfigError as exc:
        raise ConfigError(f"stage {stage.name!r}: {exc}") from exc


def config_binding(config: TrainConfig) -> dict[str, Any]:
    """What of a training config decides the trained model: the config without its paths and without the
    settings a resumed run may change (threads, loader workers, progress)."""
    from ..train.checkpoint import result_binding  # imports torch

    d = result_binding(config.to_dict())
    d.pop("init_weights", None)
    for section, keys in PATH_KEYS.items():
        for key in keys:
            d.get(section, {}).pop(key, None)
    return d
