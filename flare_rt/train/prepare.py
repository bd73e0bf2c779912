"""Everything before the first iteration, done once and kept on disk: the dataset index, the train/val
split, the fingerprint and the preprocessing cache. Each step is skipped when its result exists."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ..atomic import check_writable
from ..laterality import common_lr_axis, lr_axis
from .cache import CacheSpec, build_cache, unpack
from .config import TrainConfig
from .dataset import (NUM_CLASSES, DatasetIndex, build_index, load_index, read_annotations, save_index,
                      split_cases)
from .fingerprint import Fingerprint, load_or_compute_fingerprint

log = logging.getLogger(__name__)

INDEX_NAME = "dataset_index.json"


@dataclass(frozen=True)
class Prepared:
    index: DatasetIndex
    train_ids: tuple[str, ...]
    val_ids: tuple[str, ...]
    fingerprint: Fingerprint
    cache_dir: Path
    spec: CacheSpec
    absent: tuple[int, ...] = ()  # classes no training case annotates, learnt as absent in every case

    def cases(self, ids) -> list[tuple[str, tuple[int, ...], int]]:
        """``(id, annotated classes, left-right array axis)`` of each case, as the sampler takes them."""
        return [(i, tuple(sorted(set(self.index.case(i).annotated) | set(self.absent))),
                 lr_axis(self.index.case(i).direction, self.spec.orientation)) for i in ids]

    def lr_axis(self) -> int | None:
        """The left-right array axis of the training cases, or None where they disagree."""
        return common_lr_axis([c[2] for c in self.cases(self.train_ids)])


def index_path(config: TrainConfig) -> Path:
    if config.data.index is not None:
        return Path(config.data.index)
    return Path(config.output) / INDEX_NAME


def cache_path(config: TrainConfig) -> Path:
    if config.data.cache is not None:
        return Path(config.data.cache)
    tag = "x".join(f"{s:g}" for s in config.model.spacing)
    return index_path(config).parent / f"cache_{tag}"


def check_outputs(config: TrainConfig) -> None:
    """:class:`~flare_rt.errors.OutputError` unless the folders ``prepare`` writes to (the index's, where it
    is still to be built, and the cache) can be written; nothing is created."""
    path, cache = index_path(config), cache_path(config)
    if not path.is_file():
        check_writable(path.parent)
    if not (cache / "fingerprint.json").is_file():
        check_writable(cache)


def _index(config: TrainConfig, progress: bool = True) -> tuple[DatasetIndex, bool]:
    """(the index at data.index, or in the output folder, if it exists, else one built from data.dataset;
    whether it was built, i.e. is still to be saved)."""
    path, d = index_path(config), config.data
    if path.is_file():
        return load_index(path), False
    if d.dataset is None:
        return load_index(path), False  # raises with a fix
    return build_index(d.dataset, read_annotations(d.annotations), d.preprocess_workers, d.images, d.labels,
                       d.unlabelled, progress), True


def _save(index: DatasetIndex, path: Path) -> None:
    save_index(index, path)
    log.info("dataset index written to %s", path)


def obtain_index(config: TrainConfig, progress: bool = True) -> DatasetIndex:
    """The index at data.index (or in the output folder) if it exists, else built from data.dataset."""
    index, built = _index(config, progress)
    if built:
        _save(index, index_path(config))
    return index


def prepare(config: TrainConfig, progress: bool = True) -> Prepared:
    """Index, split, fingerprint and cache. The dataset is checked (a usable index, labelled cases for the
    split) before anything is written, so a refused dataset leaves no files behind."""
    check_outputs(config)
    index, built = _index(config, progress)
    d = config.data
    train_ids, val_ids = split_cases(index, d.train_cases, d.val_cases, d.val_fraction, config.runtime.seed)
    if built:
        _save(index, index_path(config))
    cache = cache_path(config)
    train_entries = [index.case(i) for i in train_ids]
    fp = load_or_compute_fingerprint(cache / "fingerprint.json", train_entries, d.preprocess_workers, progress)
    spec = CacheSpec(spacing=tuple(config.model.spacing), normalization=fp.normalization(),  # type: ignore[arg-type]
                     orientation=config.model.orientation)
    needed = list(dict.fromkeys(train_ids + val_ids))
    build_cache([index.case(i) for i in needed], spec, cache, d.preprocess_workers, progress)
    for case_id in needed:  # the memory-mapped copies training reads
        unpack(cache, case_id)
    log.info("%d training and %d validation cases, cache %s", len(train_ids), len(val_ids), cache)
    absent = never_annotated(index, train_ids) if config.loss.never_annotated_absent else ()
    if absent:
        log.info("classes no training case annotates, learnt as absent: %s", list(absent))
    return Prepared(index, train_ids, val_ids, fp, cache, spec, absent)


def never_annotated(index: DatasetIndex, ids) -> tuple[int, ...]:
    """The classes that none of the cases ``ids`` annotates."""
    seen = {k for i in ids for k in index.case(i).annotated}
    return tuple(k for k in range(NUM_CLASSES) if k not in seen)
