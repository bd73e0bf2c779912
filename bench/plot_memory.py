"""The whole-device GPU memory of every run over time, drawn from a bench/run.py result JSON.

    python bench/plot_memory.py RESULTS.json OUT.png

One panel per case; one curve per system and start (cold dashed, the first warm run solid), each the
NVML samples of that run against seconds since its launch, the idle reading taken before the launch
as a dotted line. Runs on any machine (matplotlib's Agg backend; no GPU, no CUDA).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchpath import BENCH, REPO  # noqa: E402,F401  (sys.path: this checkout)

from flare_rt.atomic import atomic_path  # noqa: E402
from gpu_memory import summary  # noqa: E402


class NoTracesError(ValueError):
    """The result holds no GPU memory trace to draw."""


def traces(result: dict) -> dict[str, list[tuple[str, str, dict]]]:
    """Per case: (system, start, trace) of the cold run and the first warm run of every system."""
    out: dict[str, list[tuple[str, str, dict]]] = {}
    for case, c in result.get("cases", {}).items():
        for name, entry in c["systems"].items():
            seen = set()
            for r in entry.get("runs", []):
                mem, start = r.get("gpu_memory"), r.get("start") or r.get("rep", "?")
                if mem and mem.get("samples_mib") and start not in seen:
                    seen.add(start)
                    out.setdefault(case, []).append((name, start, mem))
    return out


def plot(result: dict, png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_case = traces(result)
    if not by_case:
        raise NoTracesError("no run in this result has a GPU memory trace (gpu_memory.samples_mib); was it a GPU run?")
    gpu = result.get("machine", {}).get("gpu")
    gpu_name = gpu.get("name") if isinstance(gpu, dict) else "GPU"
    fig, axes = plt.subplots(len(by_case), 1, figsize=(11, 4.2 * len(by_case)), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (case, items) in zip(axes[:, 0], by_case.items()):
        systems = list(dict.fromkeys(name for name, _, _ in items))
        for name, start, mem in items:
            colour = colours[systems.index(name) % len(colours)]
            m = summary(mem)
            label = f"{name} ({start}): max {m['max_mib']:.0f} MiB, AUC {m['auc_mib_s']:.0f} MiB·s"
            ax.plot(mem["t_s"], mem["samples_mib"], ls="--" if start == "cold" else "-", color=colour, lw=1.4,
                    label=label)
            ax.axhline(mem["idle_mib"], color=colour, ls=":", lw=0.8)
        ax.set_title(f"{case}: whole-device GPU memory (total − free), {gpu_name}")
        ax.set_xlabel("seconds since launch")
        ax.set_ylabel("MiB")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return png


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="PNG of the GPU memory-time curves of a bench/run.py result JSON")
    p.add_argument("results", type=Path)
    p.add_argument("png", type=Path)
    args = p.parse_args(argv)
    try:
        result = json.loads(args.results.read_text())
        plot(result, args.png)
    except (OSError, ValueError) as exc:  # unreadable JSON, or NoTracesError
        sys.stderr.write(f"plot_memory: {args.results}: {exc}\n")
        return 2
    sys.stdout.write(f"wrote {args.png}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
