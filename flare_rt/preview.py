"""A PNG preview of a segmentation: axial, coronal and sagittal slices through the labels' centroid.

The arrays are first permuted/flipped (no interpolation, :mod:`flare_rt.orientation`) to one
canonical orientation, LPS (index x toward the patient's left, y posterior, z superior), so the
preview is the same whatever the stored axis order, and then shown in the radiological convention:

- axial: the patient's right on the image's left, anterior up;
- coronal: the patient's right on the image's left, superior up;
- sagittal: anterior on the image's left, superior up.

Each panel is drawn in millimetres (pixel aspect from the voxel spacing); the CT is shown with a
soft-tissue window (W 400 / L 40), the labels blended over it in the fixed colour of each class
(:data:`flare_rt.labels.COLORS`), and a legend lists the classes present anywhere in the volume.
matplotlib's Agg canvas draws it (no pyplot state); the PNG (RGB, or 256 colours when RGB would pass
:data:`MAX_PNG_BYTES`) is written atomically.
"""
from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .atomic import atomic_path
from .errors import ConfigError
from .labels import COLORS, STRUCTURE_NAMES
from .orientation import plan_reorientation
from .statistics import label_counts, sidecar_path

#: Soft-tissue window (HU).
WINDOW_WIDTH = 400.0
WINDOW_LEVEL = 40.0
#: Opacity of the label colours over the CT.
OVERLAY_ALPHA = 0.45
#: Orientation the arrays are brought to before slicing (letters for index x, y, z).
CANONICAL = "LPS"
PREVIEW_SUFFIX = "_preview.png"

# Layout in pixels (the PNG is exactly WIDTH_PX wide). All three panels share one scale (pixels per mm),
# the largest at which they fit side by side in WIDTH_PX and the tallest is at most PANEL_MAX_PX.
WIDTH_PX = 1200
DPI = 100
MARGIN_PX = 24
GAP_PX = 40  # between panels: room for the edge letters
TITLE_PX = 36
LABEL_PX = 20  # above (panel name, top letter) and below (bottom letter) the panels
PANEL_MAX_PX = 640
PANEL_MIN_PX = 80  # height of the panel row at least (a flat volume still gets its title/letter room)
LEGEND_COLUMNS = 5
LEGEND_ROW_PX = 24
#: Above this size the PNG is written with a 256-colour palette instead of RGB.
MAX_PNG_BYTES = 300_000


@dataclass(frozen=True)
class LegendEntry:
    id: int
    name: str
    color: tuple[int, int, int]  # RGB 0-255


@dataclass(frozen=True, eq=False)
class Panel:
    name: str  # axial, coronal, sagittal
    ct: np.ndarray  # 2D, rows top to bottom and columns left to right as displayed
    labels: np.ndarray  # 2D, same shape
    pixel_mm: tuple[float, float]  # (row height, column width)
    edges: tuple[str, str, str, str]  # anatomical direction at the left, right, top, bottom edge


@dataclass(frozen=True, eq=False)
class PreviewSlices:
    center: tuple[int, int, int]  # slice indices in the canonical (LPS) array, (z, y, x)
    panels: tuple[Panel, Panel, Panel]


def default_preview_path(output: str | Path) -> Path:
    """Where ``--preview`` without a path writes: beside the label file, ``<name>_preview.png``."""
    return sidecar_path(output, PREVIEW_SUFFIX)


def color_of(label_id: int) -> tuple[int, int, int]:
    """The fixed colour of a FLARE class; ids beyond the table get a stable colour of matplotlib's tab20."""
    if label_id in COLORS:
        return COLORS[label_id]
    from matplotlib import colormaps

    r, g, b, _ = colormaps["tab20"](label_id % 20)
    return int(round(r * 255)), int(round(g * 255)), int(round(b * 255))


def legend_entries(labels: np.ndarray, names: Mapping[int, str] = STRUCTURE_NAMES) -> list[LegendEntry]:
    """The classes present anywhere in ``labels`` (id order), with their names and colours."""
    counts = label_counts(labels)
    return [LegendEntry(k, names.get(k, f"label {k}"), color_of(k)) for k in np.flatnonzero(counts).tolist() if k]


def label_centroid(labels: np.ndarray) -> tuple[int, int, int]:
    """Index (per axis, rounded half up) of the centroid of the non-zero voxels; the volume's centre
    (``n // 2``) when there are none."""
    fg = labels != 0
    total = int(np.count_nonzero(fg))
    if total == 0:
        return tuple(n // 2 for n in labels.shape)  # type: ignore[return-value]
    center = []
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        profile = fg.sum(axis=others, dtype=np.int64)
        mean = float(profile @ np.arange(profile.size, dtype=np.float64)) / total
        center.append(min(int(math.floor(mean + 0.5)), labels.shape[axis] - 1))
    return tuple(center)  # type: ignore[return-value]


def _check(image: np.ndarray, labels: np.ndarray, spacing: Sequence[float], direction: Sequence[float]) -> None:
    if labels.ndim != 3 or image.shape != labels.shape or labels.size == 0:
        raise ConfigError(f"preview needs a 3D image and labels of the same shape, got image {image.shape} "
                          f"and labels {labels.shape}")
    if len(spacing) != 3 or not all(math.isfinite(float(s)) and float(s) > 0 for s in spacing):
        raise ConfigError(f"spacing must be three positive numbers (z, y, x) in mm, got {tuple(spacing)}")
    if len(direction) != 9:
        raise ConfigError(f"direction must be the 9 direction cosines of a 3D image (SimpleITK order), got "
                          f"{len(direction)} values")


def preview_slices(image: np.ndarray, labels: np.ndarray, spacing: Sequence[float],
                   direction: Sequence[float]) -> PreviewSlices:
    """The three displayed slices, as they appear on screen (see the module docstring)."""
    image, labels = np.asarray(image), np.asarray(labels)
    _check(image, labels, spacing, direction)
    plan = plan_reorientation(direction, CANONICAL)
    ct, lab = plan.apply(image), plan.apply(labels)  # views: (z, y, x) = (inferior→superior, A→P, R→L)
    sz, sy, sx = (float(s) for s in plan.spacing(tuple(spacing)))
    cz, cy, cx = label_centroid(lab)
    panels = (
        Panel("axial", ct[cz], lab[cz], (sy, sx), ("R", "L", "A", "P")),
        Panel("coronal", ct[::-1, cy, :], lab[::-1, cy, :], (sz, sx), ("R", "L", "S", "I")),
        Panel("sagittal", ct[::-1, :, cx], lab[::-1, :, cx], (sz, sy), ("A", "P", "S", "I")),
    )
    return PreviewSlices((cz, cy, cx), panels)


def _rgb(panel: Panel, lut: np.ndarray) -> np.ndarray:
    """Windowed CT in grey with the label colours blended over it, uint8 (rows, cols, 3)."""
    lo = WINDOW_LEVEL - WINDOW_WIDTH / 2
    grey = np.clip((panel.ct.astype(np.float32) - lo) / WINDOW_WIDTH, 0.0, 1.0) * 255.0
    rgb = np.repeat(grey[..., None], 3, axis=2)
    lab = np.asarray(panel.labels)
    on = lab != 0
    if on.any():
        rgb[on] = (1.0 - OVERLAY_ALPHA) * rgb[on] + OVERLAY_ALPHA * lut[lab[on]]
    return np.round(rgb).astype(np.uint8)


def _lut(max_id: int) -> np.ndarray:
    """Colour of every id 0..max_id (float RGB 0-255), indexed by label value."""
    return np.array([color_of(k) for k in range(max_id + 1)], dtype=np.float32)


@dataclass(frozen=True)
class Layout:
    height: int  # figure height in pixels
    row_top: float  # y of the panel row's top edge, pixels from the figure's top
    row_height: float
    boxes: tuple[tuple[float, float, float, float], ...]  # per panel (left, top, width, height), pixels


def layout(panels: Sequence[Panel], legend_rows: int) -> Layout:
    """Panels side by side at one common scale (pixels per mm), centred; the legend below them."""
    sizes_mm = [(p.ct.shape[1] * p.pixel_mm[1], p.ct.shape[0] * p.pixel_mm[0]) for p in panels]  # (w, h)
    avail = WIDTH_PX - 2 * MARGIN_PX - GAP_PX * (len(panels) - 1)
    scale = min(avail / sum(w for w, _ in sizes_mm), PANEL_MAX_PX / max(h for _, h in sizes_mm))
    row_h = max(PANEL_MIN_PX, max(h for _, h in sizes_mm) * scale)
    row_top = MARGIN_PX + TITLE_PX + LABEL_PX
    x = MARGIN_PX + (avail - sum(w for w, _ in sizes_mm) * scale) / 2
    boxes = []
    for w, h in sizes_mm:
        boxes.append((x, row_top + (row_h - h * scale) / 2, w * scale, h * scale))
        x += w * scale + GAP_PX
    legend_h = LEGEND_ROW_PX * max(legend_rows, 1)
    height = int(math.ceil(row_top + row_h + LABEL_PX + 8 + legend_h + MARGIN_PX))
    return Layout(height, row_top, row_h, tuple(boxes))


def _png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def render_preview(image: np.ndarray, labels: np.ndarray, spacing: Sequence[float], direction: Sequence[float],
                   path: str | Path, title: str | None = None,
                   names: Mapping[int, str] = STRUCTURE_NAMES) -> Path:
    """Write the preview PNG (``WIDTH_PX`` wide) of ``image`` (HU) and ``labels``, both (z, y, x) on the
    same grid with ``spacing`` (z, y, x, mm) and SimpleITK ``direction`` (9 cosines), atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch
    from PIL import Image

    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ConfigError(f"{path}: the preview is a PNG image; give a path ending in .png")
    slices = preview_slices(image, labels, spacing, direction)
    entries = legend_entries(labels, names)
    lut = _lut(max([e.id for e in entries], default=0))
    legend_rows = math.ceil(len(entries) / LEGEND_COLUMNS)
    lay = layout(slices.panels, legend_rows)
    H = lay.height

    fig = Figure(figsize=(WIDTH_PX / DPI, H / DPI), dpi=DPI, facecolor="black")
    FigureCanvasAgg(fig)
    fig.text(0.5, 1 - (MARGIN_PX + TITLE_PX / 2) / H, title or "flare-rt segmentation preview",
             ha="center", va="center", color="white", fontsize=13)
    text = dict(color="white", fontsize=10)
    letter = dict(color="yellow", fontsize=10, fontweight="bold")
    for panel, (left, top, w, h) in zip(slices.panels, lay.boxes):
        ax = fig.add_axes((left / WIDTH_PX, 1 - (top + h) / H, w / WIDTH_PX, h / H))
        # the box has the panel's shape in mm (layout), so filling it gives the voxel spacing's aspect
        ax.imshow(_rgb(panel, lut), interpolation="nearest", aspect="auto")
        ax.set_axis_off()
        # the panel's name above its left corner, the edge letters just outside its four edges
        ax.text(0.0, 1.0, f" {panel.name}", transform=ax.transAxes, ha="left", va="bottom", **text)
        l_, r_, t_, b_ = panel.edges
        ax.text(-0.01, 0.5, l_, transform=ax.transAxes, ha="right", va="center", **letter)
        ax.text(1.01, 0.5, r_, transform=ax.transAxes, ha="left", va="center", **letter)
        ax.text(0.5, 1.0, t_, transform=ax.transAxes, ha="center", va="bottom", **letter)
        ax.text(0.5, 0.0, b_, transform=ax.transAxes, ha="center", va="top", **letter)
    legend_top = 1 - (lay.row_top + lay.row_height + LABEL_PX + 8) / H
    if entries:
        handles = [Patch(facecolor=np.array(e.color) / 255.0, edgecolor="white", label=e.name.replace("_", " "))
                   for e in entries]
        fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, legend_top),
                   ncol=min(LEGEND_COLUMNS, len(entries)), frameon=False, labelcolor="white", fontsize=10,
                   handlelength=1.2, columnspacing=1.5, borderaxespad=0.0, borderpad=0.0)
    else:
        fig.text(0.5, legend_top - 0.5 * LEGEND_ROW_PX / H, "no structures segmented", ha="center",
                 va="center", **text)
    fig.canvas.draw()
    rgb = Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3])
    data = _png_bytes(rgb)
    if len(data) > MAX_PNG_BYTES:
        # CT noise at 0.5 mm can push the RGB image past the budget: 256 octree colours, no dithering,
        # look the same (measured on a 0.57 mm CT: 229 KB -> 64 KB, at most 15/255 off per channel)
        data = _png_bytes(rgb.quantize(colors=256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE))
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path
