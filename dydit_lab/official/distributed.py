"""Process-group plumbing shared by the sampling and latent-extraction commands under
``torchrun`` (the training loop does the same for training): one device per rank, sums
across ranks, and a clean exit."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from ..paths import resolve_device
from ..training.loop import setup_distributed


def start(device: str | torch.device = "auto") -> tuple[int, int, torch.device]:
    """(rank, world size, this rank's device): under torchrun the process group is joined
    (NCCL on CUDA, gloo on CPU) and each rank takes the GPU of its ``LOCAL_RANK``."""
    device = resolve_device(device)
    rank, world = setup_distributed(device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    return rank, world, device


def barrier(world: int) -> None:
    """Wait for every rank (nothing to wait for when alone)."""
    if world > 1:
        dist.barrier()


def sum_across(tensor: torch.Tensor, world: int) -> torch.Tensor:
    """The elementwise sum of ``tensor`` over every rank (itself when alone)."""
    if world > 1:
        dist.all_reduce(tensor)
    return tensor


def finish(world: int) -> None:
    """Leave the process group once every rank is done."""
    if world > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
