"""The pipeline's report of itself: ``report.md`` (per stage its cases, pseudo-labels, time and validation
Dice) and ``report.png`` (times and the validation Dice per class and stage), written into the work folder
after every stage, from the stages' ``state.json`` files."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..atomic import atomic_path
from ..errors import ConfigError
from ..labels import NAMES


def _load(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; {} when it is missing, unreadable or not an object (e.g. a state not
    written yet: the stage is pending)."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _bad_definition(path: Path, problem: str) -> ConfigError:
    return ConfigError(f"{path}: {problem}; this file is written by 'flare-rt pipeline run' (a JSON object with a "
                       "'name' and a list of 'stages', each with a 'name'): rerun the pipeline into this work folder "
                       "or point --work at another one")


def load_run_definition(work: Path) -> dict[str, Any]:
    """The definition a run saved in ``work`` ({} when there is none), checked for what the report and the
    status read; :class:`ConfigError` naming the file and the problem otherwise."""
    path = Path(work) / "definition.json"
    if not path.exists():
        return {}
    try:
        d = json.loads(path.read_text())
    except OSError as exc:
        raise _bad_definition(path, f"cannot be read ({exc.strerror or exc})") from exc
    except ValueError as exc:
        raise _bad_definition(path, f"not valid JSON ({exc})") from exc
    if not isinstance(d, dict):
        raise _bad_definition(path, f"a JSON {type(d).__name__}, not an object")
    if not isinstance(d.get("name"), str):
        raise _bad_definition(path, "no 'name' (a string)")
    if not isinstance(d.get("stages"), list):
        raise _bad_definition(path, "no 'stages' list")
    for i, stage in enumerate(d["stages"]):
        if not isinstance(stage, dict) or not isinstance(stage.get("name"), str) or not stage["name"]:
            raise _bad_definition(path, f"stages[{i}] is {json.dumps(stage)[:80]}, not an object with a 'name'")
    for key, kind in (("case_sets", dict), ("description", str)):
        if key in d and not isinstance(d[key], kind):
            raise _bad_definition(path, f"'{key}' is not a JSON {'object' if kind is dict else 'string'}")
    return d


def collect(work: Path) -> tuple[dict, dict, list[dict]]:
    """(run summary, definition, stage states in definition order)."""
    work = Path(work)
    run, definition = _load(work / "run.json"), load_run_definition(work)
    states = []
    for s in definition.get("stages", []):
        state = _load(work / "stages" / s["name"] / "state.json") or {"status": "pending"}
        state["stage"] = s["name"]
        state.setdefault("description", s.get("description", ""))
        states.append(state)
    return run, definition, states


def _minutes(seconds: float | None) -> str:
    return "–" if seconds is None else f"{seconds / 60:.1f} min"


def mean_dice(dice: dict[str, float]) -> float:
    vals = [v for v in dice.values() if v is not None and not math.isnan(v)]
    return sum(vals) / len(vals) if vals else math.nan


def _cases(ids: list[str], limit: int = 6) -> str:
    if not ids:
        return "–"
    shown = ", ".join(ids[:limit])
    return f"{len(ids)}: {shown}" + (", …" if len(ids) > limit else "")


def _relative(path: str, work: Path) -> str:
    p, root = Path(path), Path(work).resolve()
    return str(p.relative_to(root)) if p.is_absolute() and p.is_relative_to(root) else path


def markdown(work: Path) -> str:
    run, definition, states = collect(work)
    lines = [f"# Pipeline report: {definition.get('name', '?')}", ""]
    if definition.get("description"):
        lines += [definition["description"], ""]
    lines += [f"- dataset: `{run.get('dataset', '?')}`",
              f"- held out: {', '.join(run.get('hold_out') or []) or 'none'}",
              f"- started {run.get('started', '?')}, finished {run.get('finished', '(running)')}; stages "
              f"{_minutes(sum((s.get('pseudo_seconds') or 0) + (s.get('train_seconds') or 0) for s in states))} "
              "(pseudo-labelling and training)"]
    if run.get("final_stage"):
        lines.append(f"- model: the {run['final_stage']} model, `model.onnx` (sha256 {run['model_sha256'][:16]}…)")
    lines += ["", "## Case sets", "", "| case set | rule | cases |", "|---|---|---|"]
    for name, rule in definition.get("case_sets", {}).items():
        lines.append(f"| {name} | `{json.dumps(rule)}` | {_cases(run.get('case_sets', {}).get(name, []))} |")
    lines += ["", "## Stages", "",
              "| stage | status | model | train cases | validation cases | pseudo-labelled | iterations × batch "
              "| pseudo-labelling | training | validation Dice (mean) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for s in states:
        pseudo = s.get("pseudo_labelled") or {}
        by = sorted({p["from"] for p in pseudo.values()})
        pl = f"{len(pseudo)} by the {', '.join(by)} model" if pseudo else "–"
        val = "–" if "val_dice" not in s else f"{mean_dice(s['val_dice']):.3f}" + \
            (" (on training cases)" if s.get("validation_on_training_cases") else "")
        status = s.get("status", "pending") + (f": {s['reason']}" if s.get("reason") else "")
        its = f"{s['iterations']} × {s['batch_size']}" if "iterations" in s else "–"
        model = s.get("model", "–") + (f" (from {s['init']})" if s.get("init") else "")
        lines.append(f"| {s['stage']} | {status} | {model} | {_cases(s.get('train_cases', []))} | "
                     f"{_cases(s.get('val_cases', []))} | {pl} | {its} | {_minutes(s.get('pseudo_seconds'))} | "
                     f"{_minutes(s.get('train_seconds'))} | {val} |")
    done = [s for s in states if "val_dice" in s]
    if done:
        classes = sorted({int(k) for s in done for k, v in s["val_dice"].items() if not math.isnan(v)})
        lines += ["", "## Validation Dice per class (online validation patches, last epoch)", "",
                  "| stage | " + " | ".join(NAMES[k] for k in classes) + " |", "|---|" + "---|" * len(classes)]
        for s in done:
            vals = [s["val_dice"].get(str(k), math.nan) for k in classes]
            lines.append(f"| {s['stage']} | " + " | ".join("–" if math.isnan(v) else f"{v:.3f}" for v in vals) + " |")
    lines += ["", "## Pseudo-labels", ""]
    pseudo_lines = []
    for s in states:
        for case, p in (s.get("pseudo_labelled") or {}).items():
            names = ", ".join(NAMES[k] for k in p["classes"]) or "nothing"
            asked = f" (asked for {len(p['asked'])} classes)" if "asked" in p else ""
            ignored = f"; {p['ignored']} voxels ignored (low confidence)" if p.get("ignored") else ""
            pseudo_lines.append(f"- {s['stage']}: {case} <- the {p['from']} model filled {names}{asked}{ignored} "
                                f"(provenance: `{_relative(p['sidecar'], work)}`)")
    lines += pseudo_lines or ["none"]
    lines += ["", "![times and validation Dice](report.png)", ""]
    return "\n".join(lines)


def plot(work: Path, path: Path) -> Path:
    """Stage times (pseudo-labelling and training) and validation Dice per class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    _, _, states = collect(work)
    names = [s["stage"] for s in states]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.6), gridspec_kw={"width_ratios": [1, 2.2]})
    pseudo = [(s.get("pseudo_seconds") or 0) / 60 for s in states]
    training = [(s.get("train_seconds") or 0) / 60 for s in states]
    y = np.arange(len(names))
    a.barh(y, pseudo, color="tab:orange", label="pseudo-labelling")
    a.barh(y, training, left=pseudo, color="tab:blue", label="training")
    for i, s in enumerate(states):
        if s.get("status") != "done":
            a.text(0, i, f" {s.get('status', 'pending')}", va="center", fontsize=8, color="gray")
    a.set_yticks(y, names)
    a.invert_yaxis()
    a.set_xlabel("minutes")
    a.legend(fontsize=7, loc="lower right")
    done = [s for s in states if "val_dice" in s]
    classes = sorted({int(k) for s in done for k, v in s["val_dice"].items() if not math.isnan(v)}) or [1]
    grid = np.full((len(states), len(classes)), np.nan)
    for i, s in enumerate(states):
        for j, k in enumerate(classes):
            grid[i, j] = (s.get("val_dice") or {}).get(str(k), np.nan)
    b.imshow(np.ma.masked_invalid(grid), vmin=0, vmax=1, cmap="viridis", aspect="auto")
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            if not np.isnan(grid[i, j]):
                b.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=7,
                       color="white" if grid[i, j] < 0.6 else "black")
    b.set_xticks(range(len(classes)), [NAMES[k] for k in classes], rotation=40, ha="right", fontsize=8)
    b.set_yticks(range(len(names)), names)
    b.set_title("validation Dice (last epoch)", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=72)
    plt.close(fig)
    return path


def write_report(work: str | Path) -> tuple[Path, Path]:
    work = Path(work)
    md, png = work / "report.md", work / "report.png"
    plot(work, png)
    with atomic_path(md) as tmp:
        tmp.write_text(markdown(work))
    return md, png
