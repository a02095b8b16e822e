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


# ---------------------------------------------------------------------------- collectives
# The only hand-written collectives of udmtrain. Each is the identity without a process group (or with
# one rank), and moves its buffer to the current CUDA device for NCCL (gloo reduces CPU tensors).

def _group_size() -> int:
    dist = _dist()
    return dist.get_world_size() if dist else 1


def _comm_device():
    import torch
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _all_reduce(tensor, op: str):
    """``tensor`` reduced over ranks with ``op`` ('sum', 'min', 'max'); a CPU tensor of the same dtype."""
    import torch.distributed as dist

    buf = tensor.to(_comm_device())
    dist.all_reduce(buf, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op])
    return buf.cpu()


def all_reduce_sum(tensor):
    """Sum of ``tensor`` (any shape, CPU or CUDA) over ranks, returned on the CPU; ``tensor`` itself
    without a process group."""
    return tensor if _group_size() == 1 else _all_reduce(tensor, "sum")


def all_ranks_agree(ok: bool) -> bool:
    """Logical AND of ``ok`` over ranks (all-reduce MIN), so every rank takes the same branch."""
    if _group_size() == 1:
        return bool(ok)
    import torch

    return bool(_all_reduce(torch.tensor([int(ok)]), "min").item())


def any_rank(flag: bool) -> bool:
    """Logical OR of ``flag`` over ranks (all-reduce MAX): e.g. a signal seen by only some ranks."""
    if _group_size() == 1:
        return bool(flag)
    import torch

    return bool(_all_reduce(torch.tensor([int(flag)]), "max").item())


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` (picklable) on every rank."""
    if _group_size() == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
