"""Rows gathered on rank 0 through the process group (two gloo processes, uneven shares)."""

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dydit_lab.official.distributed import gather_rows

TOTAL = 7
SHARES = {0: [0, 2, 4, 5, 6], 1: [1, 3]}  # uneven: more rounds for rank 0 than rank 1


def _rank(rank: int, init: str, results):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    indices = SHARES[rank]
    rows = np.stack([np.full((2, 3), i, np.uint8) for i in indices])
    out = gather_rows(rows, indices, TOTAL, rank, 2, torch.device("cpu"), chunk=2)
    results[rank] = None if out is None else out.tolist()
    dist.destroy_process_group()


def test_gather_rows_places_every_rank_s_rows_in_global_order(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(_rank, args=(f"file://{tmp_path / 'init'}", results), nprocs=2)
    assert results[1] is None
    gathered = np.array(results[0])
    assert gathered.shape == (TOTAL, 2, 3) and [int(r[0, 0]) for r in gathered] == list(range(TOTAL))


def test_gather_rows_alone_is_the_rows_themselves():
    rows = np.zeros((3, 2), np.uint8)
    assert gather_rows(rows, [0, 1, 2], 3, 0, 1, torch.device("cpu")) is rows
