"""The end of training: the network as a verified fp32 bundle the runtime segments with directly."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from .. import __version__
from ..bundle import DEFAULT_TILE_STEP, BundleMeta, ResamplingRule
from ..export import default_check_inputs, export_bundle
from ..labels import NAMES
from ..nets.unet import UNet
from .config import TrainConfig
from .fingerprint import Fingerprint
from .model import inference_network

log = logging.getLogger(__name__)

BUNDLE_NAME = "model.onnx"


def bundle_meta(config: TrainConfig, fingerprint: Fingerprint, n_train: int, lr_axis: int | None = None) -> BundleMeta:
    """Metadata from the config (network, spacing, patch, TTA default) and the fingerprint (normalisation).

    ``lr_axis``: the training cases' left-right array axis. Test-time mirroring leaves it out: the network
    learnt that a mirrored right kidney is a left one, so averaging over that flip would mix the sides."""
    m = config.model
    arch = json.loads(json.dumps(m.unet(len(NAMES), deep_supervision=False).to_dict()))
    s = config.schedule
    return BundleMeta(
        name=config.name,
        labels=dict(NAMES),
        spacing=tuple(float(v) for v in m.spacing),  # type: ignore[arg-type]
        patch_size=tuple(int(v) for v in m.patch_size),  # type: ignore[arg-type]
        normalization=fingerprint.normalization(),
        architecture=arch,
        tile_step=DEFAULT_TILE_STEP,
        mirror_axes=tuple(a for a in (0, 1, 2) if a != lr_axis),
        tta=m.tta,
        orientation=m.orientation,
        transpose_forward=(0, 1, 2),
        crop_nonzero=True,
        resampling=ResamplingRule(),
        precision="fp32",
        description=f"{type(m).preset} network trained by flare-rt: {s.epochs} epochs x {s.iterations_per_epoch} "
                    f"iterations, batch {s.batch_size}, on {n_train} cases",
        source=f"flare-rt train {config.name} ({config.data.dataset or config.data.index})",
        producer=f"flare-rt {__version__}",
    )


def check_patch(cache_dir: str | Path, case_ids: Sequence[str], patch: tuple[int, int, int]) -> np.ndarray:
    """A real (1, 1, *patch) input for the export check: the centre of the largest cached training case,
    its edge voxels repeated where the case is smaller than the patch. (Zero padding makes InstanceNorm
    ill-conditioned: the small network's fp32 export differed from PyTorch by 1.8e-4 and 3e-4 of the
    largest logit on zero-padded 30-slice cases, against 5e-6 on a whole patch; the check is meant to
    catch export mistakes, not that rounding.)"""
    from .cache import open_case

    def voxels(case_id: str) -> int:
        return int(np.prod(json.loads((Path(cache_dir) / f"{case_id}.json").read_text())["shape"]))

    case = open_case(cache_dir, max(case_ids, key=voxels), ())
    lo = (np.asarray(case.shape) - np.asarray(patch)) // 2
    index = [np.clip(np.arange(a, a + p), 0, n - 1) for a, p, n in zip(lo, patch, case.shape)]
    return np.asarray(case.image[np.ix_(*index)], dtype=np.float32)[None, None]


def export_trained(net: UNet, meta: BundleMeta, path: str | Path, real_patch: np.ndarray | None = None) -> Path:
    """Export ``net`` (deep supervision dropped) to ``path`` and verify it against PyTorch."""
    inference = inference_network(net)
    out, results = export_bundle(inference, meta, path, "fp32", default_check_inputs(meta, real_patch))
    log.info("bundle %s (%.1f MB): %s", out, out.stat().st_size / 1e6, "; ".join(r.line() for r in results))
    return out
