"""One host-side all-to-all case (`Comm.all_to_all_on_host`) for every backend, with ragged and
empty splits (rank 1 sends nothing, the others 0-2 rows per peer, themselves included), and its brute-force
reference built from every rank's input in one process."""
from __future__ import annotations

import torch


def send_splits(rank: int, G: int) -> list[int]:
    return [0 if rank == 1 else (rank + j + 1) % 3 for j in range(G)]


def rows_of(rank: int, G: int) -> torch.Tensor:
    """Rank `rank`'s table: int64 rows [rank, row index, row index squared]."""
    i = torch.arange(sum(send_splits(rank, G)), dtype=torch.int64)
    return torch.stack([torch.full_like(i, rank), i, i * i], dim=1)


def host_all_to_all(comm) -> torch.Tensor:
    """What this rank receives, with the splits every rank knows."""
    G = comm.world_size
    recv = [send_splits(j, G)[comm.rank] for j in range(G)]
    return comm.all_to_all_on_host(rows_of(comm.rank, G), send_splits(comm.rank, G), recv)


def reference(rank: int, G: int) -> torch.Tensor:
    """Brute force: from every source in rank order, its block of rows for `rank`."""
    blocks = [rows_of(j, G).split(send_splits(j, G))[rank] for j in range(G)]
    return torch.cat(blocks)
