"""Rank/world helpers that work with or without torch.distributed initialised."""

from __future__ import annotations

import os


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def get_rank() -> int:
    """Global rank: from the process group if initialised, else the launcher's RANK, else 0."""
    dist = _dist()
    return dist.get_rank() if dist else int(os.environ.get("RANK", 0))


def get_world_size() -> int:
    """World size: from the process group if initialised, else WORLD_SIZE, else 1."""
    dist = _dist()
    return dist.get_world_size() if dist else int(os.environ.get("WORLD_SIZE", 1))


def get_local_rank() -> int:
    """Local rank from LOCAL_RANK (set by deepspeed/torchrun), else 0."""
    return int(os.environ.get("LOCAL_RANK", 0))


def is_rank0() -> bool:
    return get_rank() == 0


def print0(*args, **kwargs) -> None:
    """print() on global rank 0 only."""
    if is_rank0():
        print(*args, **kwargs, flush=True)
