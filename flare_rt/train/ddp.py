"""Multi-GPU / multi-node training through torchrun and ``DistributedDataParallel``.

``torchrun --nproc_per_node=N -m flare_rt train CONFIG`` (or ``python -m torch.distributed.run ...``)
sets RANK, WORLD_SIZE and LOCAL_RANK; :func:`setup` reads them and joins the process group (NCCL on
GPUs, gloo on CPUs). Without them training runs as a single process."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ..errors import BackendUnavailableError, ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool  # this module initialised the process group (and tears it down)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    try:
        return int(value) if value is not None else default
    except ValueError as exc:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer (set by torchrun)") from exc


def pick_device(preference: str, local_rank: int = 0) -> torch.device:
    if preference == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailableError("runtime.device is 'cuda' but torch sees no CUDA device; use 'cpu' or 'auto'")
    if preference == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def setup(device: str = "auto", timeout_min: float = 120.0) -> DistContext:
    """Join the torchrun process group if there is one; pick this process's device."""
    world = _env_int("WORLD_SIZE", 1)
    rank, local = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    dev = pick_device(device, local)
    owns = False
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=timedelta(minutes=timeout_min))
        owns = True
        log.info("rank %d of %d on %s (%s)", rank, world, dev, dist.get_backend())
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistContext(rank, world, local, dev, owns)


def wrap(net: torch.nn.Module, ctx: DistContext, all_parameters_used: bool = True) -> torch.nn.Module:
    """``DistributedDataParallel`` in a distributed run (it broadcasts rank 0's weights), else ``net``.
    ``all_parameters_used=False`` (no deep supervision: the auxiliary heads idle) lets DDP skip them."""
    if not ctx.distributed:
        return net
    from torch.nn.parallel import DistributedDataParallel

    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(net, device_ids=ids, find_unused_parameters=not all_parameters_used)


def unwrap(net: torch.nn.Module) -> torch.nn.Module:
    return net.module if hasattr(net, "module") else net


def all_reduce_sum(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    if ctx.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def teardown(ctx: DistContext) -> None:
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def per_process_batch(batch_size: int, ctx: DistContext) -> int:
    """The global batch split over the processes (as nnU-Net's DDP trainer)."""
    if batch_size % ctx.world_size:
        raise ConfigError(f"schedule.batch_size {batch_size} does not split over {ctx.world_size} processes; "
                          f"use a multiple of {ctx.world_size}")
    return batch_size // ctx.world_size
