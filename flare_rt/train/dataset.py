"""The dataset index: which cases exist, their geometry and which classes each one annotates.

Layouts read: FLARE23 (``imagesTr/<case>_0000.nii.gz``, ``labelsTr/<case>.nii.gz``, unlabelled images in
their own folder) and nnU-Net raw (the same plus ``dataset.json``, whose ``file_ending`` is used), or
explicit (image, label) pairs, e.g. a DICOM series with a NIfTI label. The annotated classes of a case
are declared (an ``annotations`` mapping) or inferred (the label values present); the index is a small
JSON file, so they can be overridden by editing it.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..atomic import atomic_path
from ..errors import ConfigError, InputImageError
from ..io import Volume, load_volume, read_header, read_image
from ..labels import IGNORE_ID, NAMES, NUM_CLASSES
from .parallel import parallel_map

log = logging.getLogger(__name__)

INDEX_FORMAT = 1

BACKGROUND = 0


@dataclass(frozen=True)
class CaseSource:
    """Where a case's files are (before anything is read)."""

    id: str
    image: str
    label: str | None


@dataclass(frozen=True)
class CaseEntry:
    id: str
    image: str
    label: str | None
    shape: tuple[int, int, int]  # z, y, x
    spacing: tuple[float, float, float]  # z, y, x mm
    origin: tuple[float, float, float]  # x, y, z (ITK)
    direction: tuple[float, ...]  # ITK, row-major 3x3
    present: tuple[int, ...]  # label values in the label map
    annotated: tuple[int, ...]  # classes the label map annotates (always includes background)
    annotated_source: str  # "declared", "inferred" or "unlabelled"

    @property
    def labelled(self) -> bool:
        return self.label is not None

    @property
    def fully_annotated(self) -> bool:
        return len(self.annotated) == NUM_CLASSES


@dataclass(frozen=True)
class DatasetIndex:
    cases: tuple[CaseEntry, ...]
    source: str
    layout: str  # "flare23", "nnunet" or "pairs"
    labels: dict[int, str]

    def labelled(self) -> tuple[CaseEntry, ...]:
        return tuple(c for c in self.cases if c.labelled)

    def case(self, case_id: str) -> CaseEntry:
        for c in self.cases:
            if c.id == case_id:
                return c
        raise ConfigError(f"case {case_id!r} is not in the dataset index ({len(self.cases)} cases, e.g. "
                          f"{[c.id for c in self.cases[:3]]}); check data.train_cases / data.val_cases")

    def with_annotations(self, annotations: Mapping[str, Sequence[int]]) -> "DatasetIndex":
        """Override the annotated classes of some cases (validated against their present labels)."""
        by_id = {c.id: c for c in self.cases}
        unknown = sorted(set(annotations) - set(by_id))
        if unknown:
            raise ConfigError(f"annotations name cases not in the index: {unknown[:5]}")
        cases = tuple(replace(c, annotated=check_annotated(c.id, c.present, annotations[c.id]),
                              annotated_source="declared") if c.id in annotations else c for c in self.cases)
        return replace(self, cases=cases)

    def to_json(self) -> str:
        d = {"format": INDEX_FORMAT, "source": self.source, "layout": self.layout,
             "labels": {str(k): v for k, v in self.labels.items()}, "cases": [asdict(c) for c in self.cases]}
        return json.dumps(d, indent=1)

    @classmethod
    def from_json(cls, text: str, where: str = "index") -> "DatasetIndex":
        try:
            d = json.loads(text)
            if int(d.get("format", 0)) != INDEX_FORMAT:
                raise ConfigError(f"{where}: dataset index format {d.get('format')} is not {INDEX_FORMAT}; "
                                  "delete it to rebuild it")
            cases = tuple(CaseEntry(**{k: tuple(v) if isinstance(v, list) else v for k, v in c.items()})
                          for c in d["cases"])
            return cls(cases, d["source"], d["layout"], {int(k): v for k, v in d["labels"].items()})
        except ConfigError:
            raise
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{where}: malformed dataset index ({exc}); delete it to rebuild it") from exc


def save_index(index: DatasetIndex, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(index.to_json() + "\n")
    return path


def load_index(path: str | Path) -> DatasetIndex:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: dataset index not found; build it with data.dataset set (or build_index())")
    return DatasetIndex.from_json(path.read_text(), str(path))


# -- discovery ---------------------------------------------------------------------------------------
def _strip(name: str, ending: str) -> str:
    return name[: -len(ending)] if name.endswith(ending) else name


def discover(root: str | Path, images: str = "imagesTr", labels: str = "labelsTr",
             unlabelled: str = "unlabeledTr") -> tuple[str, list[CaseSource]]:
    """The layout name and the cases of a FLARE23 or nnU-Net raw dataset folder."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"{root}: dataset folder not found; pass the folder holding {images}/ and {labels}/")
    layout, ending = "flare23", ".nii.gz"
    meta = root / "dataset.json"
    if meta.is_file():
        layout = "nnunet"
        try:
            d = json.loads(meta.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{meta}: not valid JSON ({exc})") from exc
        ending = d.get("file_ending", ending)
        channels = d.get("channel_names") or d.get("modality") or {"0": "CT"}
        if len(channels) != 1:
            raise ConfigError(f"{meta}: {len(channels)} input channels; flare-rt trains single-channel CT models")
        values = {int(v) for v in (d.get("labels") or {}).values() if not isinstance(v, (list, tuple))}
        if values and max(values) >= NUM_CLASSES:
            raise ConfigError(f"{meta}: label values {sorted(values)} exceed the FLARE23 table (0..{NUM_CLASSES - 1})")
    suffix = f"_0000{ending}"
    img_dir = root / images
    if not img_dir.is_dir():
        raise ConfigError(f"{root}: no {images}/ folder; expected {images}/<case>{suffix} "
                          f"(set data.images to the folder's name)")
    cases = []
    for img in sorted(img_dir.glob(f"*{suffix}")):
        case = _strip(img.name, suffix)
        lab = root / labels / f"{case}{ending}"
        if not lab.is_file():
            log.warning("%s: no label %s; the case is indexed as unlabelled", img, lab)
        cases.append(CaseSource(case, str(img), str(lab) if lab.is_file() else None))
    extra = root / unlabelled
    if extra.is_dir():
        for img in sorted(extra.glob(f"*{ending}")):
            case = _strip(_strip(img.name, ending), "_0000")
            cases.append(CaseSource(case, str(img), None))
    ids = [c.id for c in cases]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ConfigError(f"{root}: case ids occur twice (labelled and unlabelled?): {dupes[:5]}")
    if not cases:
        raise ConfigError(f"{img_dir}: no images named <case>{suffix}")
    return layout, cases


# -- reading -----------------------------------------------------------------------------------------
def _geometry(image) -> dict[str, Any]:
    return {"shape": tuple(int(s) for s in reversed(image.GetSize())),
            "spacing": tuple(float(s) for s in reversed(image.GetSpacing())),
            "origin": tuple(float(o) for o in image.GetOrigin()),
            "direction": tuple(float(d) for d in image.GetDirection())}


def image_geometry(path: str | Path) -> dict[str, Any]:
    """Shape/spacing (z, y, x), origin and direction of an image file (header only) or DICOM series."""
    path = Path(path)
    if path.is_dir():
        return _geometry(read_image(path))
    if not path.is_file():
        raise InputImageError(f"{path}: image not found")
    return _geometry(read_header(path))


def geometry_mismatch(image, label, rel_tol: float = 1e-3) -> str | None:
    """Why ``label`` does not lie voxel for voxel on ``image``'s grid, or None."""
    a, b = _geometry(image), _geometry(label)
    if a["shape"] != b["shape"]:
        return f"shape {b['shape']} vs image {a['shape']}"
    if not np.allclose(a["spacing"], b["spacing"], rtol=rel_tol, atol=0):
        return f"spacing {b['spacing']} vs image {a['spacing']}"
    if not np.allclose(a["direction"], b["direction"], atol=rel_tol):
        return f"direction {b['direction']} vs image {a['direction']}"
    if np.abs(np.subtract(a["origin"], b["origin"])).max() > 0.5 * min(a["spacing"]):
        return f"origin {b['origin']} vs image {a['origin']}"
    return None


def read_label(path: str | Path, image_reference) -> np.ndarray:
    """A label map as uint8 (z, y, x), checked to lie on the grid of ``image_reference`` (a SimpleITK
    image of the CT's size and geometry)."""
    import SimpleITK as sitk

    path = Path(path)
    if not path.is_file():
        raise InputImageError(f"{path}: label file not found")
    label = read_image(path)
    bad = geometry_mismatch(image_reference, label)
    if bad:
        raise InputImageError(f"{path}: the label is not on its image's grid ({bad}); resample it onto the image "
                              "(e.g. SimpleITK.Resample(label, image, Transform(), sitkNearestNeighbor))")
    array = sitk.GetArrayFromImage(label)
    if array.dtype.kind == "f":
        if not np.array_equal(array, np.round(array)):
            raise InputImageError(f"{path}: label map holds non-integer values")
    bad = label_values_outside(np.unique(array))
    if bad:
        raise InputImageError(f"{path}: label values {bad} are outside the FLARE23 table 0..{NUM_CLASSES - 1} "
                              f"(and {IGNORE_ID}, ignore)")
    return array.astype(np.uint8, copy=False)


def grid_image(shape_zyx, spacing_xyz, origin, direction):
    """An empty SimpleITK image with this grid (to check a label against without the CT's voxels)."""
    import SimpleITK as sitk

    ref = sitk.Image([int(s) for s in reversed(shape_zyx)], sitk.sitkUInt8)
    ref.SetSpacing(tuple(spacing_xyz))
    ref.SetOrigin(tuple(origin))
    ref.SetDirection(tuple(direction))
    return ref


def load_case(entry: CaseEntry) -> tuple[Volume, np.ndarray | None]:
    """The CT (validated by :func:`flare_rt.io.load_volume`) and its label map (or None)."""
    volume = load_volume(entry.image)
    if entry.label is None:
        return volume, None
    g = volume.geometry
    ref = grid_image(volume.array.shape, g.spacing, g.origin, g.direction)
    return volume, read_label(entry.label, ref)


def label_values_outside(values: np.ndarray) -> list[int]:
    """Values of a label map that are neither FLARE23 classes nor the ignore label."""
    return [int(v) for v in values if not (0 <= v < NUM_CLASSES or v == IGNORE_ID)]


def check_annotated(case_id: str, present: Sequence[int], annotated: Sequence[int]) -> tuple[int, ...]:
    ann = sorted({int(a) for a in annotated} | {BACKGROUND})
    bad = [a for a in ann if not 0 <= a < NUM_CLASSES]
    if bad:
        raise ConfigError(f"case {case_id}: annotated classes {bad} outside 0..{NUM_CLASSES - 1}")
    stray = sorted(set(int(p) for p in present) - set(ann))
    if stray:
        raise ConfigError(f"case {case_id}: label values {stray} are present but not declared annotated "
                          f"({ann}); add them to the case's annotations")
    return tuple(ann)


def describe_case(job: tuple[CaseSource, tuple[int, ...] | None]) -> CaseEntry:
    """Geometry and present/annotated classes of one case (reads the label voxels, the image header)."""
    import SimpleITK as sitk

    src, declared = job
    geo = image_geometry(src.image)
    present: tuple[int, ...] = ()
    if src.label is not None:
        label = read_image(src.label)
        ref = grid_image(geo["shape"], tuple(reversed(geo["spacing"])), geo["origin"], geo["direction"])
        bad = geometry_mismatch(ref, label)
        if bad:
            raise InputImageError(f"{src.label}: the label is not on its image's grid ({bad}); resample it onto "
                                  "the image (SimpleITK.Resample(label, image, Transform(), sitkNearestNeighbor))")
        values = np.unique(sitk.GetArrayViewFromImage(label))
        if label_values_outside(values):
            raise InputImageError(f"{src.label}: label values {values.tolist()} outside 0..{NUM_CLASSES - 1} "
                                  f"(and {IGNORE_ID}, ignore)")
        present = tuple(int(v) for v in values if v != IGNORE_ID)
    if src.label is None:
        annotated, how = (), "unlabelled"
    elif declared is not None:
        annotated, how = check_annotated(src.id, present, declared), "declared"
    else:
        annotated, how = tuple(sorted(set(present) | {BACKGROUND})), "inferred"
    return CaseEntry(src.id, src.image, src.label, geo["shape"], geo["spacing"], geo["origin"], geo["direction"],
                     present, annotated, how)


def read_annotations(path: str | Path | None) -> dict[str, tuple[int, ...]]:
    """``{case: [label ids]}`` from a JSON file (None: nothing declared)."""
    if path is None:
        return {}
    path = Path(path)
    try:
        d = json.loads(path.read_text())
        return {str(k): tuple(int(v) for v in vs) for k, vs in d.items()}
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: annotations file not found") from exc
    except (json.JSONDecodeError, TypeError, ValueError, AttributeError) as exc:
        raise ConfigError(f"{path}: annotations must be a JSON object {{case: [label ids]}} ({exc})") from exc


def index_cases(sources: Sequence[CaseSource], layout: str, source: str,
                annotations: Mapping[str, Sequence[int]] | None = None, workers: int = 1,
                progress: bool = True) -> DatasetIndex:
    """Describe ``sources`` (in parallel) into a :class:`DatasetIndex`."""
    annotations = dict(annotations or {})
    unknown = sorted(set(annotations) - {s.id for s in sources})
    if unknown:
        raise ConfigError(f"annotations name cases that do not exist: {unknown[:5]}")
    jobs = [(s, tuple(annotations[s.id]) if s.id in annotations else None) for s in sources]
    cases = parallel_map(describe_case, jobs, workers, "index", progress)
    index = DatasetIndex(tuple(cases), source, layout, dict(NAMES))
    n_lab = len(index.labelled())
    partial = sum(1 for c in index.labelled() if not c.fully_annotated)
    log.info("indexed %d cases from %s: %d labelled (%d partially annotated), %d unlabelled",
             len(cases), source, n_lab, partial, len(cases) - n_lab)
    return index


def build_index(root: str | Path, annotations: Mapping[str, Sequence[int]] | None = None, workers: int = 1,
                images: str = "imagesTr", labels: str = "labelsTr", unlabelled: str = "unlabeledTr",
                progress: bool = True) -> DatasetIndex:
    """Index a FLARE23 / nnU-Net raw dataset folder."""
    layout, sources = discover(root, images, labels, unlabelled)
    return index_cases(sources, layout, str(Path(root).resolve()), annotations, workers, progress)


def index_from_pairs(pairs: Sequence[tuple[str, str | Path, str | Path | None]],
                     annotations: Mapping[str, Sequence[int]] | None = None, workers: int = 1,
                     progress: bool = False) -> DatasetIndex:
    """Index explicit ``(case id, image, label or None)`` triples (images may be DICOM folders)."""
    sources = [CaseSource(str(i), str(Path(img).resolve()), str(Path(lab).resolve()) if lab else None)
               for i, img, lab in pairs]
    return index_cases(sources, "pairs", "pairs", annotations, workers, progress)


def split_cases(index: DatasetIndex, train_cases: Sequence[str] = (), val_cases: Sequence[str] = (),
                val_fraction: float = 0.2, seed: int = 0) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(train ids, val ids) among the labelled cases. Explicit lists win; otherwise a seeded random
    ``val_fraction`` is held out (at least one case when there are two or more)."""
    labelled = [c.id for c in index.labelled()]
    if not labelled:
        raise ConfigError(f"the dataset index ({index.source}) has no labelled case to train on; add label maps "
                          "(labelsTr/<case>.nii.gz beside imagesTr/<case>_0000.nii.gz, or set data.labels)")
    for name, ids in (("train_cases", train_cases), ("val_cases", val_cases)):
        for i in ids:
            if not index.case(i).labelled:
                raise ConfigError(f"data.{name}: case {i!r} has no label")
    val = tuple(val_cases)
    if not val and val_fraction > 0 and len(labelled) > 1:
        order = np.random.default_rng(seed).permutation(len(labelled))
        n_val = max(1, int(round(val_fraction * len(labelled))))
        val = tuple(sorted(labelled[i] for i in order[:n_val]))
    train = tuple(train_cases) or tuple(i for i in labelled if i not in set(val))
    if not train:
        raise ConfigError(f"no training cases left after holding out {list(val)}; set data.train_cases")
    if not val:
        log.warning("no validation case: online validation runs on the training cases %s", list(train)[:3])
        val = train
    return train, val
