"""Evaluation outputs: per-case CSV, Markdown summary, one box plot PNG per class.

matplotlib is imported only when plots are written (Agg canvas, no pyplot state).
"""
from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

from flare_rt.atomic import atomic_path, check_writable
from flare_rt.errors import ConfigError, OutputError
from flare_rt.evaluate.metrics import CaseResult, ClassSummary, EvaluationOptions, Summary
from flare_rt.labels import NAMES, NSD_TOLERANCE_MM, ORGAN_IDS, ZRANGE_CUT_IDS

CSV_NAME = "scores.csv"
MARKDOWN_NAME = "summary.md"
PLOT_DIR = "plots"
CSV_HEADER = ("case", "class_id", "class_name", "dsc", "nsd")


def fmt(value: float) -> str:
    """4 decimals, ``nan`` for NaN."""
    return "nan" if math.isnan(value) else f"{value:.4f}"


def write_csv(results: Iterable[CaseResult], path: Path) -> Path:
    """One row per case and class: case, class id, class name, DSC, NSD."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_HEADER)
        for result in results:
            for s in result.scores:
                writer.writerow((result.case, s.class_id, s.name, fmt(s.dsc), fmt(s.nsd)))
    return path


def _mean_std(mean: float, std: float) -> str:
    return f"{fmt(mean)} ± {fmt(std)}"


def render_markdown(summary: Summary, options: EvaluationOptions) -> str:
    """The summary as Markdown: organ and tumour means, per-class table, missing predictions."""
    zcut = ", ".join(NAMES[c] for c in ZRANGE_CUT_IDS)
    zrange = (
        "inclusive (all GT slices kept)" if options.inclusive_zrange
        else "official (top GT slice dropped)"
    )
    lines = [
        "# FLARE DSC / NSD evaluation",
        "",
        f"- cases: {summary.n_cases}"
        + (f" ({len(summary.missing)} without a prediction, scored as empty)" if summary.missing else ""),
        f"- NSD = 0 when DSC < {options.dsc_cutoff:g}; z-range cut of {zcut}: {zrange}",
        "- values: mean ± population std over cases (per-case values rounded to 4 decimals); organs: mean of "
        "the organ class means, std over cases of each case's organ mean",
        "",
        "| | DSC | NSD |",
        "|---|---|---|",
    ]
    n_organs = sum(1 for s in summary.classes if s.class_id in ORGAN_IDS)
    lines.append(
        f"| organs ({n_organs}) | {_mean_std(summary.organ_dsc, summary.organ_dsc_std)} "
        f"| {_mean_std(summary.organ_nsd, summary.organ_nsd_std)} |"
    )
    if summary.tumor is not None:
        t = summary.tumor
        lines.append(f"| tumour | {_mean_std(t.dsc_mean, t.dsc_std)} | {_mean_std(t.nsd_mean, t.nsd_std)} |")
    lines += [
        "",
        "## Per class",
        "",
        "| id | class | DSC | NSD | NSD tolerance (mm) | NaN values |",
        "|---:|---|---|---|---:|---:|",
    ]
    lines += [_class_row(s) for s in summary.classes]
    if summary.missing:
        lines += ["", "## Missing predictions (scored as empty)", ""]
        lines += [f"- {case}" for case in summary.missing]
    return "\n".join(lines) + "\n"


def _class_row(s: ClassSummary) -> str:
    return (
        f"| {s.class_id} | {s.name} | {_mean_std(s.dsc_mean, s.dsc_std)} | "
        f"{_mean_std(s.nsd_mean, s.nsd_std)} | {NSD_TOLERANCE_MM[s.class_id]:g} | {s.n_nan} |"
    )


def write_box_plots(results: Sequence[CaseResult], folder: Path) -> list[Path]:
    """One PNG per class with the DSC and NSD distributions over the cases."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ConfigError(
            "box plots need matplotlib: pip install matplotlib (or pass --no-plots)"
        ) from exc
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for class_id in [s.class_id for s in results[0].scores]:
        dsc = [r.score(class_id).dsc for r in results if not math.isnan(r.score(class_id).dsc)]
        nsd = [r.score(class_id).nsd for r in results if not math.isnan(r.score(class_id).nsd)]
        figure = Figure(figsize=(3.2, 3.6), dpi=100)
        FigureCanvasAgg(figure)
        axes = figure.add_subplot()
        axes.boxplot([dsc, nsd])
        axes.set_xticks([1, 2], ["DSC", "NSD"])
        axes.set_ylim(-0.02, 1.02)
        axes.set_title(f"{class_id} {NAMES[class_id]} (n={len(results)})", fontsize=10)
        axes.grid(axis="y", alpha=0.3)
        figure.tight_layout()
        path = folder / f"boxplot_{class_id:02d}_{NAMES[class_id]}.png"
        with atomic_path(path) as tmp:
            figure.savefig(tmp)
        paths.append(path)
    return paths


def check_report_folder(out: Path) -> None:
    """:class:`OutputError` unless the report can be written into ``out``: the folder (or the nearest one
    above it) is writable and no folder or file stands where ``write_report`` writes the other kind."""
    check_writable(out)
    for path, kind in ((out / CSV_NAME, "a file"), (out / MARKDOWN_NAME, "a file"), (out / PLOT_DIR, "a folder")):
        if path.exists() and path.is_dir() != (kind == "a folder"):
            raise OutputError(f"{path}: cannot write, {'a file' if kind == 'a folder' else 'a folder'} is in the "
                              f"way of {kind}; remove it or choose another --out")


def write_report(
    results: Sequence[CaseResult],
    summary: Summary,
    options: EvaluationOptions,
    out: Path,
    plots: bool = True,
) -> dict[str, Path]:
    """Write ``scores.csv``, ``summary.md`` and (``plots``) ``plots/boxplot_<id>_<name>.png``, each atomically;
    a folder or file in the way of any of them is refused before the first is written."""
    check_report_folder(out)
    written = {"csv": write_csv(results, out / CSV_NAME)}
    markdown = out / MARKDOWN_NAME
    with atomic_path(markdown) as tmp:
        tmp.write_text(render_markdown(summary, options))
    written["markdown"] = markdown
    if plots:
        written["plots"] = out / PLOT_DIR
        write_box_plots(results, out / PLOT_DIR)
    return written
