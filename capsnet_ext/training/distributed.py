"""Process-group setup for multi-GPU / multi-node training with ``torchrun``.

``torchrun --nproc_per_node=N -m capsnet_ext.cli train ...`` sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK`` (and the rendezvous variables); the trainer then initialises the default
process group (NCCL on GPUs, gloo on the CPU), pins each rank to ``cuda:LOCAL_RANK``, splits
every global batch across ranks, and lets only rank 0 write logs and checkpoints.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: torch.device) -> DistInfo:
    """Join the process group described by the ``torchrun`` environment, if any.

    An already initialised group (e.g. created by a test harness) is used as is.
    """
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(),
                        int(os.environ.get("LOCAL_RANK", dist.get_rank())), False)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return DistInfo(rank, world_size, local_rank, True)


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``"auto"``: ``cuda:LOCAL_RANK`` when a GPU is present, else the CPU."""
    from .._cli import parse_device

    if parse_device(name, option="device") == "auto":  # ValueError naming what is wrong
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    return device


def barrier(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.barrier()


def broadcast_flag(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """True on every rank when any rank's ``flag`` is true (used to stop all ranks together
    when one receives Ctrl-C / SIGTERM)."""
    if not info.enabled:
        return flag
    tensor = torch.tensor([1.0 if flag else 0.0],
                          device=device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item() > 0)


def cleanup(info: DistInfo) -> None:
    if info.initialized_here and dist.is_initialized():
        dist.destroy_process_group()
