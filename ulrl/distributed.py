"""Gathering rows from every torch.distributed rank, for global triplet negatives (no Ray import).

Every function is the identity on a single process (torch.distributed unavailable, not initialised, or a
world of one), so unit tests and evaluation run the same code path as a one-rank job.

Gradients: the gathered result keeps the autograd graph of *this* rank's rows only; other ranks' rows are
constants here (their own rank back-propagates through them). This is open_clip's default
``gather_with_grad=False`` behaviour: each rank differentiates its local loss with respect to its local
embeddings, and DDP averages the parameter gradients.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` outside an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_rows(*tensors: torch.Tensor) -> tuple[list[torch.Tensor], int]:
    """Concatenate each tensor's rows from every rank, in rank order, keeping this rank's gradients.

    All tensors share their leading size B_r on rank r; ranks may differ (a short last batch), so rows are
    padded to the largest B_r for ``all_gather`` and trimmed afterwards.

    Returns:
        The gathered tensors, each (N, ...) with N = Σ_r B_r, and ``offset`` = Σ_{r < rank} B_r, the
        position of this rank's first row in them. On one process: the inputs themselves and 0.
    """
    rank, world_size = world()
    if world_size == 1:
        return list(tensors), 0
    counts = _row_counts(tensors[0].shape[0], tensors[0].device, world_size)
    gathered = [_gather_padded(t, counts, rank) for t in tensors]
    return gathered, sum(counts[:rank])


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """One tensor's rows from every rank, (N, ...), the local slot keeping its autograd graph."""
    return gather_rows(tensor)[0][0]


def _row_counts(rows: int, device: torch.device, world_size: int) -> list[int]:
    count = torch.tensor([rows], dtype=torch.int64, device=device)
    counts = [torch.zeros_like(count) for _ in range(world_size)]
    dist.all_gather(counts, count)
    return [int(c.item()) for c in counts]


def _gather_padded(tensor: torch.Tensor, counts: list[int], rank: int) -> torch.Tensor:
    padded = tensor.new_zeros((max(counts), *tensor.shape[1:]))  # (max B_r, ...)
    padded[: tensor.shape[0]] = tensor.detach()
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    parts = [part[:n] for part, n in zip(parts, counts)]
    parts[rank] = tensor  # the received copy has no graph; put the live local tensor back in its slot
    return torch.cat(parts)
