"""Tiny generated CT cases (FLARE23 layout) for the training tests: air, a body ellipse and organ blocks
with their own Hounsfield values, so a network can learn them in a few iterations."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

ORGAN_HU = {1: 60.0, 2: 150.0, 3: 110.0, 5: 250.0}  # liver, right kidney, spleen, aorta


def synthetic_case(seed: int, shape=(20, 72, 72), classes=(1, 2, 3, 5)) -> tuple[np.ndarray, np.ndarray]:
    """(image int16 HU, labels uint8), (z, y, x)."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    cy, cx = shape[1] / 2 + rng.uniform(-3, 3), shape[2] / 2 + rng.uniform(-3, 3)
    body = ((y - cy) / (0.42 * shape[1])) ** 2 + ((x - cx) / (0.45 * shape[2])) ** 2 < 1
    image = np.where(body, 0.0, -1000.0) + rng.normal(0, 15, shape)
    labels = np.zeros(shape, np.uint8)
    boxes = {1: (0.25, 0.30, 0.20), 2: (0.55, 0.60, 0.55), 3: (0.30, 0.35, 0.65), 5: (0.55, 0.40, 0.45)}
    sizes = {1: (0.5, 0.22, 0.25), 2: (0.3, 0.12, 0.12), 3: (0.35, 0.15, 0.12), 5: (0.7, 0.08, 0.08)}
    for k in classes:
        lo = [int(s * (f + rng.uniform(-0.04, 0.04))) for s, f in zip(shape, boxes[k])]
        hi = [min(s, a + max(2, int(s * w))) for s, a, w in zip(shape, lo, sizes[k])]
        sl = tuple(slice(a, b) for a, b in zip(lo, hi))
        labels[sl] = k
    for k in classes:
        image[labels == k] = ORGAN_HU[k] + rng.normal(0, 10, int((labels == k).sum()))
    return image.astype(np.int16), labels


def write(path: Path, array: np.ndarray, spacing_zyx=(4.0, 2.4, 2.4)) -> Path:
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(tuple(float(s) for s in reversed(spacing_zyx)))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))
    return path


def flare_dataset(root: Path, n: int = 3, partial: dict[int, tuple[int, ...]] | None = None,
                  spacing_zyx=(4.0, 2.4, 2.4), shape=(20, 72, 72)) -> Path:
    """``root/imagesTr/case_XX_0000.nii.gz`` + ``labelsTr/case_XX.nii.gz``; ``partial`` maps a case number
    to the classes it annotates (the others are left out of its label map)."""
    for i in range(n):
        classes = (partial or {}).get(i, (1, 2, 3, 5))
        image, labels = synthetic_case(i, shape, classes)
        write(root / "imagesTr" / f"case_{i:02d}_0000.nii.gz", image, spacing_zyx)
        write(root / "labelsTr" / f"case_{i:02d}.nii.gz", labels, spacing_zyx)
    return root


def tiny_config(root: Path, out: Path, **sections):
    """A tiny-network config over the synthetic dataset; ``sections`` replace whole sections."""
    from flare_rt.train import (AugmentConfig, DataConfig, RuntimeConfig, ScheduleConfig, TinyModel,
                                TrainConfig)

    data = DataConfig(dataset=str(root), index=str(root.parent / "index.json"), cache=str(root.parent / "cache"),
                      val_cases=("case_01",), preprocess_workers=1)
    kw = dict(name="tiny-test", model=TinyModel(), data=data, output=str(out),
              schedule=ScheduleConfig(epochs=2, iterations_per_epoch=2, val_iterations=1, checkpoint_every=1),
              augment=AugmentConfig(), runtime=RuntimeConfig(num_workers=0, progress=False, export=False))
    kw.update(sections)
    return TrainConfig(**kw)
