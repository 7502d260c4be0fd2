"""Process-group plumbing shared by the sampling and latent-extraction commands under
``torchrun`` (the training loop does the same for training): one device per rank, sums
across ranks, rows gathered on rank 0 through the process group (no shared filesystem
needed, so it works across nodes), and a clean exit."""

from __future__ import annotations

import os

import numpy as np
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


def gather_rows(rows: np.ndarray, indices: list[int], total: int, rank: int, world: int,
                device: torch.device, chunk: int = 256) -> np.ndarray | None:
    """Every rank's ``rows`` placed at their global ``indices`` in one array of ``total`` rows,
    on rank 0 (None on the others). Sent through the process group ``chunk`` rows per rank at a
    time, so no collective carries the whole set and no rank needs a filesystem the others see."""
    if world == 1:
        return rows
    rounds = torch.tensor([-(-len(indices) // chunk)], device=device)
    dist.all_reduce(rounds, op=dist.ReduceOp.MAX)  # ranks may hold different row counts
    out = None
    for i in range(int(rounds.item())):
        part = (indices[i * chunk:(i + 1) * chunk], rows[i * chunk:(i + 1) * chunk])
        received = [None] * world if rank == 0 else None
        dist.gather_object(part, received, dst=0)
        for where, values in received or []:
            if len(where):  # a rank may have had fewer rows (or none)
                if out is None:
                    out = np.empty((total, *values.shape[1:]), values.dtype)
                out[where] = values
    return out


def finish(world: int) -> None:
    """Leave the process group once every rank is done."""
    if world > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
