"""``train(config) -> TrainResult``: the one training loop every model and stage runs through.

Composition, not subclassing: the config picks the network, data, augmentation, loss and schedule;
:mod:`prepare` builds the cache, :mod:`sampling` feeds batches from background workers, :mod:`augment`
warps them on the device, :mod:`loss` scores them, :mod:`checkpoint` makes the run resumable,
:mod:`ddp` spreads it over processes and :mod:`export` turns the result into a bundle."""
from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from ..atomic import check_writable
from ..errors import ConfigError, ExportVerificationError, FlareError
from ..labels import NAMES, NUM_CLASSES
from . import ddp
from .augment import augment_batch
from .checkpoint import FINAL, LATEST, check_same_config, load_checkpoint, restore_rng, save_checkpoint
from .config import TrainConfig, save_config
from .dice import confusion, dice_from_counts
from .fingerprint import Fingerprint
from .loss import segmentation_loss
from .model import init_network, load_initial_weights
from .prepare import Prepared, prepare
from .progress import EpochRecord, plot, write_csv
from .release import BUNDLE_NAME, bundle_meta, check_patch, export_trained
from .sampling import TRAIN_STREAM, VAL_STREAM, PatchBatches, SamplerSpec, make_loader

log = logging.getLogger(__name__)

EpochCallback = Callable[[EpochRecord], None]


class TrainingDiverged(FlareError):
    """The loss became NaN or infinite."""

    exit_code = 8


@dataclass(frozen=True)
class TrainResult:
    output_dir: Path
    checkpoint: Path
    bundle: Path | None  # None when runtime.export is off (or on ranks other than 0)
    history: tuple[EpochRecord, ...]
    fingerprint: Fingerprint
    model: torch.nn.Module  # the trained network (deep supervision on), on the CPU, eval mode
    rank: int = 0


def poly_lr(initial: float, epoch: int, epochs: int, exponent: float) -> float:
    """nnU-Net's poly schedule, set at the start of each epoch."""
    return initial * (1 - epoch / epochs) ** exponent


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _finest(outputs):
    return outputs if isinstance(outputs, torch.Tensor) else outputs[0]


def _autocast(device: torch.device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.float16) if enabled else nullcontext()


def validate(net: torch.nn.Module, batches: PatchBatches, indices: Sequence[int], config: TrainConfig,
             device: torch.device, amp: bool, ctx: ddp.DistContext) -> tuple[float, list[float]]:
    """(mean loss, per-class Dice) over the validation batches ``indices`` of this rank (counts summed
    over ranks). No augmentation; fixed batches, so epochs compare."""
    net.eval()
    counts = torch.zeros(3, NUM_CLASSES, dtype=torch.float64, device=device)
    loss_sum = torch.zeros(2, dtype=torch.float64, device=device)
    from torch.utils.data import DataLoader

    loader = DataLoader(batches, batch_size=None, sampler=list(indices),
                        num_workers=min(config.runtime.num_workers, len(indices)), pin_memory=device.type == "cuda")
    with torch.no_grad():
        for batch in loader:
            batch = _to_device(batch, device)
            image, labels = batch["image"].float(), batch["labels"]
            with _autocast(device, amp):
                out = net(image)
            loss_sum += torch.stack([segmentation_loss(out, labels, batch["annotated"], config.loss).double(),
                                     torch.ones((), dtype=torch.float64, device=device)])
            pred = _finest(out).argmax(1)
            counts += confusion(pred, labels[:, 0], batch["annotated"], NUM_CLASSES)
    ddp.all_reduce_sum(counts, ctx)
    ddp.all_reduce_sum(loss_sum, ctx)
    net.train()
    loss = float(loss_sum[0] / loss_sum[1]) if loss_sum[1] > 0 else math.nan
    return loss, dice_from_counts(counts.cpu())


def training_batches(config: TrainConfig, prepared: Prepared, batch_size: int, rank: int = 0) -> PatchBatches:
    m = config.model
    spec = SamplerSpec(m.patch_size, m.spacing, batch_size, config.schedule.oversample_foreground, config.augment)
    return PatchBatches(prepared.cache_dir, prepared.cases(prepared.train_ids), spec, config.runtime.seed, rank,
                        TRAIN_STREAM).prepare()


def validation_batches(config: TrainConfig, prepared: Prepared, batch_size: int) -> PatchBatches:
    """The fixed validation batches (no augmentation; the same every epoch and on every rank count)."""
    m = config.model
    spec = SamplerSpec(m.patch_size, m.spacing, batch_size, config.schedule.oversample_foreground, None)
    return PatchBatches(prepared.cache_dir, prepared.cases(prepared.val_ids), spec, config.runtime.seed, 0,
                        VAL_STREAM).prepare()


def validation_scores(net: torch.nn.Module, config: TrainConfig, prepared: Prepared,
             device: str | torch.device = "cpu") -> tuple[float, list[float]]:
    """(loss, per-class Dice) of ``net`` on the config's validation batches, as the loop's online validation
    (e.g. for an untrained or imported network)."""
    dev = torch.device(device)
    batches = validation_batches(config, prepared, config.schedule.batch_size)
    ctx = ddp.DistContext(0, 1, 0, dev, False)
    loss, dice = validate(net.to(dev), batches, range(config.schedule.val_iterations), config, dev, False, ctx)
    return loss, dice


def _resume_state(config: TrainConfig, out: Path, resume: bool) -> dict | None:
    latest = out / LATEST
    if not latest.is_file():
        return None
    if not resume:
        raise ConfigError(f"{out} already holds a run ({latest.name}); pass --resume (resume=True) to continue it "
                          "or choose another output folder")
    ckpt = load_checkpoint(latest)
    check_same_config(ckpt, config.to_dict(), latest)
    log.info("resuming %s after epoch %d (iteration %d)", latest, ckpt["epoch"], ckpt["iteration"])
    return ckpt


def train(config: TrainConfig, resume: bool = False, callbacks: Sequence[EpochCallback] = (),
          prepared: Prepared | None = None) -> TrainResult:
    """Train ``config`` to completion (or resume it) and export the bundle. ``callbacks`` run after each
    epoch's checkpoint with the epoch's record (on every rank); ``prepared`` skips :func:`prepare`."""
    ctx = ddp.setup(config.runtime.device, config.runtime.ddp_timeout_min)
    try:
        return _train(config, resume, callbacks, prepared, ctx)
    finally:
        ddp.teardown(ctx)


@dataclass
class _Run:
    """The mutable state of one run (what a checkpoint holds)."""

    net: torch.nn.Module  # unwrapped
    model: torch.nn.Module  # what is called: ``net`` or its DistributedDataParallel wrapper
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    history: list[EpochRecord]
    start_epoch: int


def _prepare_data(config: TrainConfig, ctx: ddp.DistContext, progress: bool) -> Prepared:
    """Rank 0 prepares; the others then find the index, fingerprint and cache on disk."""
    prepared = prepare(config, progress=progress) if ctx.is_main else None
    ddp.barrier(ctx)
    return prepared if prepared is not None else prepare(config, progress=False)


def _start(config: TrainConfig, ctx: ddp.DistContext, ckpt: dict | None, amp: bool) -> _Run:
    """A He-initialised network (or ``init_weights``) with its optimiser, restored from the checkpoint
    ``ckpt`` when resuming."""
    o = config.optim
    net = init_network(config.model, NUM_CLASSES, config.loss.deep_supervision, seed=config.runtime.seed,
                        negative_slope=o.he_negative_slope)
    if config.init_weights:
        load_initial_weights(net, config.init_weights)
    net = net.to(ctx.device)
    optimizer = torch.optim.SGD(net.parameters(), lr=o.lr, momentum=o.momentum, nesterov=o.nesterov,
                                weight_decay=o.weight_decay)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=amp)
    history, start_epoch = [], 0
    if ckpt is not None:
        net.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        history = [EpochRecord.from_dict(r) for r in ckpt["history"]]
        start_epoch = int(ckpt["epoch"])
        restore_rng(ckpt["rng"])
    model = ddp.wrap(net, ctx, all_parameters_used=config.loss.deep_supervision)
    return _Run(net, model, optimizer, scaler, history, start_epoch)


def _train_step(run: _Run, batch: dict, config: TrainConfig, amp: bool) -> float:
    """Augment on the device, forward, deep-supervised loss, backward, clip, SGD step; the loss value."""
    device = batch["image"].device
    with torch.no_grad():
        image, labels = augment_batch(batch, config.model.patch_size)
    with _autocast(device, amp):
        outputs = run.model(image)
    loss = segmentation_loss(outputs, labels, batch["annotated"], config.loss)
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.unscale_(run.optimizer)
    torch.nn.utils.clip_grad_norm_(run.model.parameters(), config.optim.grad_clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    return float(loss.detach())


def _epoch(run: _Run, epoch: int, loader, config: TrainConfig, ctx: ddp.DistContext, amp: bool,
           show: bool) -> tuple[float, list[float], float, float]:
    """One epoch of training: (lr, iteration losses, seconds waiting for data, seconds stepping)."""
    from tqdm import tqdm

    s, o = config.schedule, config.optim
    lr = poly_lr(o.lr, epoch, s.epochs, o.poly_exponent)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    run.model.train()
    data_s = step_s = 0.0
    losses: list[float] = []
    bar = tqdm(range(s.iterations_per_epoch), desc=f"epoch {epoch + 1}/{s.epochs}", unit="it", disable=not show,
               leave=False)
    for _ in bar:
        t0 = time.perf_counter()
        batch = _to_device(next(loader), ctx.device)
        t1 = time.perf_counter()
        value = _train_step(run, batch, config, amp)
        if not math.isfinite(value) and not amp:  # with AMP the scaler skips such steps
            raise TrainingDiverged(f"loss is {value} at epoch {epoch + 1}; lower optim.lr or check the data "
                                   "(labels outside 0..14, constant images)")
        losses.append(value)
        data_s += t1 - t0
        step_s += time.perf_counter() - t1
        bar.set_postfix(loss=f"{value:.3f}")
    return lr, losses, data_s, step_s


def _train(config: TrainConfig, resume: bool, callbacks: Sequence[EpochCallback], prepared: Prepared | None,
           ctx: ddp.DistContext) -> TrainResult:
    rt, sched = config.runtime, config.schedule
    if rt.threads:
        torch.set_num_threads(rt.threads)
    out = Path(config.output)
    show = rt.progress and ctx.is_main
    # Everything that can refuse the run does so before anything is written: an output folder that cannot
    # be written, a run there that would be overwritten or resumed with another config, a bad dataset.
    check_writable(out)  # on every rank, so that all of them stop (none waits at a barrier for rank 0)
    ckpt = _resume_state(config, out, resume)
    prepared = prepared or _prepare_data(config, ctx, show)
    if ctx.is_main:
        save_config(config, out / "config.json")
    amp = rt.amp and ctx.device.type == "cuda"
    if ctx.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    batch = ddp.per_process_batch(sched.batch_size, ctx)
    run = _start(config, ctx, ckpt, amp)

    its = sched.iterations_per_epoch
    loader = iter(make_loader(training_batches(config, prepared, batch, ctx.rank), run.start_epoch * its,
                              sched.epochs * its, rt.num_workers, ctx.device.type == "cuda"))
    val_batches = validation_batches(config, prepared, batch)
    val_indices = list(range(ctx.rank, sched.val_iterations, ctx.world_size))
    for epoch in range(run.start_epoch, sched.epochs):
        t0 = time.perf_counter()
        lr, losses, data_s, step_s = _epoch(run, epoch, loader, config, ctx, amp, show)
        train_loss = ddp.all_reduce_sum(torch.tensor([sum(losses), len(losses)], dtype=torch.float64,
                                                     device=ctx.device), ctx)
        val_loss, dice = math.nan, [math.nan] * NUM_CLASSES
        last = epoch + 1 == sched.epochs
        if (epoch + 1) % sched.val_every == 0 or last:
            val_loss, dice = validate(run.model, val_batches, val_indices, config, ctx.device, amp, ctx)
        record = EpochRecord(epoch + 1, lr, float(train_loss[0] / train_loss[1]), val_loss, tuple(dice),
                             time.perf_counter() - t0, data_s, step_s, tuple(losses))
        run.history.append(record)
        log.info("epoch %d/%d: lr %.5f, train loss %.4f, val loss %.4f, mean Dice %.4f (%.1fs: data %.1fs, "
                 "step %.1fs)", record.epoch, sched.epochs, lr, record.train_loss, val_loss,
                 record.mean_foreground_dice, record.seconds, data_s, step_s)
        if ctx.is_main:
            write_csv(run.history, NAMES, out / "progress.csv")
            plot(run.history, NAMES, out / "progress.png")
            if (epoch + 1) % sched.checkpoint_every == 0 or last:
                save_checkpoint(out / LATEST, model=run.net, optimizer=run.optimizer, scaler=run.scaler,
                                epoch=epoch + 1, iteration=(epoch + 1) * its,
                                history=[r.to_dict() for r in run.history], config=config.to_dict(),
                                fingerprint=json.loads(prepared.fingerprint.to_json()))
        ddp.barrier(ctx)
        for cb in callbacks:
            cb(record)

    bundle = _finish(config, prepared, run, out) if ctx.is_main else None
    ddp.barrier(ctx)
    trained = run.net.cpu().eval()
    return TrainResult(out, out / FINAL, bundle, tuple(run.history), prepared.fingerprint, trained, ctx.rank)


def _finish(config: TrainConfig, prepared: Prepared, run: _Run, out: Path) -> Path | None:
    """Keep the final checkpoint and export the verified bundle (rank 0)."""
    final = out / FINAL
    final.write_bytes((out / LATEST).read_bytes())
    if not config.runtime.export:
        return None
    meta = bundle_meta(config, prepared.fingerprint, len(prepared.train_ids), prepared.lr_axis())
    patch = check_patch(prepared.cache_dir, prepared.train_ids, config.model.patch_size)
    try:
        return export_trained(run.net, meta, out / BUNDLE_NAME, patch)
    except ExportVerificationError as exc:
        raise ExportVerificationError(f"{exc}. Training itself finished: the weights are in {final}; rerun with "
                                      "--resume (resume=True) to retry the export") from exc
