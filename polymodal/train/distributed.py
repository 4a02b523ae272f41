"""Process start-up and DDP wrapping for the training floor.

`init_distributed` reads torchrun's environment and creates the process group; `wrap_ddp` wraps a
module for DistributedDataParallel when there is more than one process; `cleanup` ends the job.
Collectives (gathers, reductions, groups) live on the ground floor, `polymodal.distributed`; the few
that the trainer uses are re-exported here so train code has one place to import from.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from ..distributed import (all_reduce_mean, all_reduce_min, barrier, clear_group_cache, env_int, is_dist,
                           local_world_size, rank, world_size)

__all__ = ["DistInfo", "init_distributed", "wrap_ddp", "cleanup", "all_reduce_mean", "all_reduce_min", "barrier",
           "rank", "world_size"]


@dataclass
class DistInfo:
    """Where this process sits in the job.

    Attributes:
        rank: global rank (0 in a single process).
        world_size: number of processes (1 in a single process).
        local_rank: rank inside this machine (selects the GPU).
        local_world_size: processes on this machine.
        backend: "gloo", "nccl", or None when not distributed.
        device: the device this process should use.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    backend: str | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(backend: str | None = None, timeout_s: float = 1800.0) -> DistInfo:
    """Initialise the default process group from torchrun's environment variables.

    A no-op (returns a single-process `DistInfo`) when WORLD_SIZE is unset or 1. When a
    group is already initialised it is reused.

    Args:
        backend: "gloo" or "nccl"; default nccl when CUDA is available, else gloo.
        timeout_s: how long collectives wait before failing (seconds).

    Returns:
        A `DistInfo` for this process.
    """
    ws = env_int("WORLD_SIZE", 1)
    cuda = torch.cuda.is_available()
    if ws <= 1 and not is_dist():
        return DistInfo(device=torch.device("cuda", 0) if cuda else torch.device("cpu"))
    if not is_dist():
        rk, local_rank = env_int("RANK"), env_int("LOCAL_RANK")
        if "MASTER_ADDR" not in os.environ:
            raise RuntimeError("environment variable MASTER_ADDR is not set; launch with torchrun")
        env_int("MASTER_PORT")
        backend = backend or ("nccl" if cuda else "gloo")
        if backend == "nccl":
            # Bind the GPU before creating the group so NCCL does not default everyone to cuda:0.
            torch.cuda.set_device(local_rank)
        dist.init_process_group(
            backend, init_method="env://", rank=rk, world_size=ws, timeout=timedelta(seconds=timeout_s)
        )
    backend = dist.get_backend()
    local_rank = env_int("LOCAL_RANK", 0)
    device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    return DistInfo(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        local_world_size=local_world_size(),
        backend=backend,
        device=device,
    )


def wrap_ddp(module: nn.Module, info: DistInfo) -> nn.Module:
    """`module` wrapped in DistributedDataParallel when the job has several processes, else itself."""
    if info.world_size <= 1:
        return module
    return nn.parallel.DistributedDataParallel(
        module, device_ids=[info.device.index] if info.device.type == "cuda" else None)


def cleanup() -> None:
    """Destroy the process group (if any) and forget the cached sub-groups.

    Every rank waits for the others first: a rank that tears gloo down while a peer still talks to it can abort
    the peer ("terminate called without an active exception")."""
    clear_group_cache()
    if is_dist():
        dist.barrier()
        dist.destroy_process_group()
