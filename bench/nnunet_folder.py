"""Rebuild an nnU-Net v2 model folder from a flare-rt bundle's weights, for machines that receive the
plans but not the checkpoint (the GPU check carries 64 MiB at most; the checkpoint is 22 MB).

    python bench/nnunet_folder.py BUNDLE.onnx PLANS_DIR OUT_DIR [--fold 0]

PLANS_DIR holds the model's ``plans.json`` and ``dataset.json``; OUT_DIR gets those two and
``fold_F/checkpoint_final.pth`` with the bundle's weights in nnU-Net's own network (built by nnU-Net's
trainer class exactly as its predictor builds it, so every alias key nnU-Net stores is there). The
script checks that nnU-Net's network and flare-rt's give the same logits on a random tile before it
writes anything. Both systems then run identical weights (an fp16 bundle's weights are its fp16
values, widened to fp32).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from benchpath import BENCH, REPO  # noqa: E402,F401  (sys.path: this checkout)

from flare_rt.atomic import atomic_path  # noqa: E402
from flare_rt.errors import FlareError  # noqa: E402

CONFIGURATION = "3d_fullres"
TOLERANCE = 1e-4  # max |Δ logit| between the two networks on the check tile (fp32, CPU)


class RebuildError(RuntimeError):
    pass


def nnunet_network(plans: dict, dataset: dict, configuration: str = CONFIGURATION):
    """nnU-Net's network for ``configuration`` as its predictor builds it (trainer class, no deep supervision)."""
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    import nnunetv2

    pm = PlansManager(plans)
    cm = pm.get_configuration(configuration)
    trainer = recursive_find_python_class(str(Path(nnunetv2.__path__[0]) / "training" / "nnUNetTrainer"),
                                          "nnUNetTrainer", "nnunetv2.training.nnUNetTrainer")
    return trainer.build_network_architecture(pm, cm, determine_num_input_channels(pm, cm, dataset),
                                              pm.get_label_manager(dataset).num_segmentation_heads,
                                              enable_deep_supervision=False).eval()


def rebuild(bundle_path: Path, plans_dir: Path, out_dir: Path, fold: str = "0", seed: int = 0) -> Path:
    import torch

    from flare_rt.bundle import Bundle
    from flare_rt.nets import network_from_bundle

    plans = json.loads((plans_dir / "plans.json").read_text())
    dataset = json.loads((plans_dir / "dataset.json").read_text())
    bundle = Bundle.load(bundle_path)
    ours = network_from_bundle(bundle)
    theirs = nnunet_network(plans, dataset)
    result = theirs.load_state_dict(ours.state_dict(), strict=False)
    # what nnU-Net has beyond flare-rt's canonical keys must be its aliases (same parameters)
    leftover = [k for k in result.missing_keys if ".all_modules." not in k and not k.startswith("decoder.encoder.")]
    if leftover or result.unexpected_keys:
        raise RebuildError(f"weights do not map onto nnU-Net's network: missing {leftover[:5]}, "
                           f"unexpected {result.unexpected_keys[:5]}")
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 1, *bundle.meta.patch_size, generator=gen)
    with torch.no_grad():
        diff = float((ours(x) - theirs(x)).abs().max())
    if not diff <= TOLERANCE:
        raise RebuildError(f"nnU-Net's network differs from flare-rt's by {diff:.3g} (> {TOLERANCE}) on a random tile")
    ckpt = {"network_weights": theirs.state_dict(), "trainer_name": "nnUNetTrainer",
            "init_args": {"plans": plans, "configuration": CONFIGURATION, "fold": int(fold), "dataset_json": dataset},
            "inference_allowed_mirroring_axes": tuple(bundle.meta.mirror_axes),
            "rebuilt_from": f"{bundle_path.name} (flare-rt bundle, {bundle.meta.precision})"}
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("plans.json", "dataset.json"):
        shutil.copyfile(plans_dir / name, out_dir / name)
    dst = out_dir / f"fold_{fold}" / "checkpoint_final.pth"
    with atomic_path(dst) as tmp:
        torch.save(ckpt, tmp)
    sys.stdout.write(f"rebuilt {dst} from {bundle_path} (check tile max |Δ| {diff:.2e})\n")
    return out_dir


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="nnU-Net v2 model folder from a flare-rt bundle's weights")
    p.add_argument("bundle", type=Path)
    p.add_argument("plans_dir", type=Path, help="folder with the model's plans.json and dataset.json")
    p.add_argument("out_dir", type=Path)
    p.add_argument("--fold", default="0")
    args = p.parse_args(argv)
    try:
        rebuild(args.bundle, args.plans_dir, args.out_dir, args.fold)
    except (RebuildError, FlareError, OSError, ValueError) as exc:
        sys.stderr.write(f"nnunet_folder: {exc}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
