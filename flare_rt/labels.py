"""The FLARE23 label table: ids, names and the NSD tolerances of the official evaluation."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Label:
    id: int
    name: str
    nsd_tolerance_mm: float | None  # None for background
    color: tuple[int, int, int]  # RGB 0-255 of the overlay in previews; distinct hues for neighbours


FLARE23_LABELS: tuple[Label, ...] = (
    Label(0, "background", None, (0, 0, 0)),
    Label(1, "liver", 5.0, (230, 110, 60)),
    Label(2, "right_kidney", 3.0, (255, 215, 0)),
    Label(3, "spleen", 3.0, (150, 70, 200)),
    Label(4, "pancreas", 5.0, (255, 150, 200)),
    Label(5, "aorta", 2.0, (220, 20, 60)),
    Label(6, "ivc", 2.0, (40, 110, 255)),
    Label(7, "right_adrenal", 2.0, (0, 210, 210)),
    Label(8, "left_adrenal", 2.0, (0, 150, 130)),
    Label(9, "gallbladder", 2.0, (60, 190, 75)),
    Label(10, "esophagus", 3.0, (170, 110, 40)),
    Label(11, "stomach", 5.0, (245, 235, 150)),
    Label(12, "duodenum", 7.0, (130, 220, 255)),
    Label(13, "left_kidney", 3.0, (200, 180, 0)),
    Label(14, "tumor", 2.0, (255, 0, 255)),
)

NUM_CLASSES = len(FLARE23_LABELS)  # background + 13 organs + tumour
ORGAN_IDS: tuple[int, ...] = tuple(range(1, 14))
TUMOR_ID = 14
#: Classes the official script cuts to the z-range of the ground truth before scoring.
ZRANGE_CUT_IDS: tuple[int, ...] = (5, 6, 10)

NAMES: dict[int, str] = {lab.id: lab.name for lab in FLARE23_LABELS}
#: The structures (every class but background), e.g. for per-structure statistics.
STRUCTURE_NAMES: dict[int, str] = {k: v for k, v in NAMES.items() if k != 0}
#: Fixed overlay colour (RGB 0-255) per class, the same in every preview.
COLORS: dict[int, tuple[int, int, int]] = {lab.id: lab.color for lab in FLARE23_LABELS}
NSD_TOLERANCE_MM: dict[int, float] = {
    lab.id: lab.nsd_tolerance_mm for lab in FLARE23_LABELS if lab.nsd_tolerance_mm is not None
}

#: Per-voxel "ignore" label of training label maps (e.g. low-confidence pseudo-labels): not background,
#: not a class; it carries no loss, is never sampled as foreground and is never scored.
IGNORE_ID = 255
#: Classes that swap when the patient's left-right axis is mirrored: (right kidney, left kidney),
#: (right adrenal, left adrenal).
LATERAL_PAIRS: tuple[tuple[int, int], ...] = ((2, 13), (7, 8))
