"""Training throughput of flare-rt's trainer: iterations per second and where the time goes.

For each model config (tiny, small, big) the real CT ``ts_example_ct_sm`` is preprocessed into a cache at
the model's spacing, then the training step is run exactly as ``flare_rt.train.loop`` runs it, timed in
stages, after warm-up iterations, with the device synchronised around each stage:

  data     waiting for the next batch from the DataLoader (background workers sample and crop patches)
  copy     host -> device transfer
  augment  the batched spatial + intensity augmentation (grid_sample) on the device
  forward  network + deep-supervised Dice/CE loss
  backward backward pass, gradient clipping and the SGD step

It also times the loader alone (batches/s it can deliver with the same workers), which says whether
data loading keeps up with the step. Results are printed and written as JSON.

    python bench/train_throughput.py                          # tiny and small on the CPU, 1 thread
    python bench/train_throughput.py --configs small --device cuda --iterations 50 --workers 4
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from flare_rt.train.augment import augment_batch  # noqa: E402
from flare_rt.train.config import (MODEL_PRESETS, DataConfig, RuntimeConfig, ScheduleConfig,  # noqa: E402
                                   TrainConfig)
from flare_rt.train.dataset import index_from_pairs, save_index  # noqa: E402
from flare_rt.train.loop import training_batches  # noqa: E402
from flare_rt.train.loss import segmentation_loss  # noqa: E402
from flare_rt.train.model import init_network  # noqa: E402
from flare_rt.train.prepare import prepare  # noqa: E402
from flare_rt.resources import shared_data_dir  # noqa: E402
from flare_rt.devices import cpu_name  # noqa: E402
from flare_rt.train.sampling import make_loader  # noqa: E402

log = logging.getLogger("train_throughput")
DATA = shared_data_dir()
STAGES = ("data", "copy", "augment", "forward", "backward")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({os.cpu_count()} cores, torch threads {torch.get_num_threads()})"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_config(preset: str, work: Path, workers: int, device: str) -> TrainConfig:
    index = index_from_pairs([("ts_sm", DATA / "ts_example_ct_sm.nii.gz", DATA / "ts_example_ct_sm_seg_flare.nii.gz")],
                             annotations={"ts_sm": range(15)})
    path = save_index(index, work / "index.json")
    return TrainConfig(name=f"bench-{preset}", model=MODEL_PRESETS[preset](),
                       data=DataConfig(index=str(path), cache=str(work / f"cache_{preset}"), train_cases=("ts_sm",),
                                       val_cases=("ts_sm",), preprocess_workers=1),
                       output=str(work / preset), schedule=ScheduleConfig(epochs=1, iterations_per_epoch=1),
                       runtime=RuntimeConfig(num_workers=workers, device=device, progress=False, export=False))


def time_training(config: TrainConfig, iterations: int, warmup: int, device: torch.device, amp: bool) -> dict:
    prepared = prepare(config, progress=False)
    s, o = config.schedule, config.optim
    batches = training_batches(config, prepared, s.batch_size)
    net = init_network(config.model, 15, seed=0).to(device)
    optimizer = torch.optim.SGD(net.parameters(), lr=o.lr, momentum=o.momentum, nesterov=o.nesterov,
                                weight_decay=o.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    loader = iter(make_loader(batches, 0, warmup + iterations, config.runtime.num_workers, device.type == "cuda"))
    times = {k: [] for k in STAGES}
    for it in range(warmup + iterations):
        t = [time.perf_counter()]
        batch = next(loader)
        t.append(time.perf_counter())
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        sync(device)
        t.append(time.perf_counter())
        with torch.no_grad():
            image, labels = augment_batch(batch, config.model.patch_size)
        sync(device)
        t.append(time.perf_counter())
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            outputs = net(image)
        loss = segmentation_loss(outputs, labels, batch["annotated"], config.loss)
        sync(device)
        t.append(time.perf_counter())
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(net.parameters(), o.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        sync(device)
        t.append(time.perf_counter())
        if it >= warmup:
            for k, a, b in zip(STAGES, t[:-1], t[1:]):
                times[k].append(b - a)
    per_it = float(np.sum([np.mean(v) for v in times.values()]))
    return {"iterations": iterations, "it_per_s": 1 / per_it, "seconds_per_it": per_it,
            "stages_ms": {k: 1000 * float(np.mean(v)) for k, v in times.items()},
            "stages_share": {k: float(np.mean(v)) / per_it for k, v in times.items()}}


def time_loader(config: TrainConfig, batches_n: int) -> dict:
    prepared = prepare(config, progress=False)
    batches = training_batches(config, prepared, config.schedule.batch_size)
    loader = iter(make_loader(batches, 10_000, 10_000 + batches_n + 2, config.runtime.num_workers, False))
    next(loader), next(loader)  # workers started
    t0 = time.perf_counter()
    sizes = []
    for _ in range(batches_n):
        b = next(loader)
        sizes.append(int(np.prod(b["image"].shape)))
    dt = time.perf_counter() - t0
    return {"batches_per_s": batches_n / dt, "mean_region_voxels": float(np.mean(sizes))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="tiny,small", help="comma list of tiny, small, big")
    p.add_argument("--iterations", type=int, default=10, help="timed iterations per config")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--workers", type=int, default=1, help="DataLoader worker processes")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--amp", action="store_true", help="mixed precision (CUDA only)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not (DATA / "ts_example_ct_sm.nii.gz").is_file():
        log.error("real CT not found in %s (set FLARE_RT_DATA)", DATA)
        return 2
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    if load > 0.5:
        log.warning("load average %.2f at start: other work on the machine slows these numbers", load)
    results = {"device": device_name(device), "torch": torch.__version__, "workers": args.workers,
               "threads": args.threads, "amp": args.amp and device.type == "cuda", "load_average": load,
               "configs": {}}
    with tempfile.TemporaryDirectory(prefix="flare_rt_bench_") as tmp:
        for preset in [c.strip() for c in args.configs.split(",") if c.strip()]:
            config = make_config(preset, Path(tmp), args.workers, args.device)
            r = time_training(config, args.iterations, args.warmup, device, results["amp"])
            r["loader"] = time_loader(config, max(4, args.iterations // 2))
            r["patch"] = list(config.model.patch_size)
            r["batch"] = config.schedule.batch_size
            results["configs"][preset] = r
            st = r["stages_ms"]
            log.info("%s: %.2f it/s (%.0f ms/it: %s); loader alone %.1f batches/s", preset, r["it_per_s"],
                     1000 * r["seconds_per_it"], ", ".join(f"{k} {v:.0f}" for k, v in st.items()),
                     r["loader"]["batches_per_s"])
    print(f"\ntraining throughput on {results['device']}, torch {results['torch']}, "
          f"{args.workers} loader worker(s), load average {load:.2f} at start")
    print(f"{'config':8} {'patch':>14} {'it/s':>6} " + " ".join(f"{k + ' ms':>12}" for k in STAGES) + f" {'loader b/s':>11}")
    for name, r in results["configs"].items():
        print(f"{name:8} {'x'.join(map(str, r['patch'])):>14} {r['it_per_s']:6.2f} "
              + " ".join(f"{r['stages_ms'][k]:12.0f}" for k in STAGES) + f" {r['loader']['batches_per_s']:11.1f}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"train_throughput_{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=1))
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
