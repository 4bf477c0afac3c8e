"""What the ranks of a training group agree on: one answer broadcast from rank 0, values reduced over all,
seeds derived per rank. Each works without a process group too (one worker, or no Ray Train)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist


def distributed() -> bool:
    """Whether this rank is in a process group (one worker, or no Ray Train, has none)."""
    return dist.is_available() and dist.is_initialized()


def agree_on(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (which checkpoint to load must be one answer for all)."""
    if not distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def across_ranks(values: list[float], device: torch.device, op: dist.ReduceOp) -> list[float]:
    """``values`` reduced over the DDP ranks (as they are without a process group)."""
    if not distributed():
        return values
    t = torch.tensor(values, device=device, dtype=torch.float64)
    dist.all_reduce(t, op=op)
    return t.tolist()


def barrier() -> None:
    if distributed():
        dist.barrier()


def derive_seed(*parts: int) -> int:
    """A 31-bit seed from integers (the run's seed, a rank, an epoch, ...): different parts give
    independent streams, the same parts the same one, so a resumed run repeats its randomness."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] >> 1)
