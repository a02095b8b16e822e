"""The hand-written collectives (udmtrain/utils/dist.py) on two real gloo ranks, and without a group."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from udmtrain.utils import dist as ud


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        total = ud.all_reduce_sum(torch.tensor([1.0, float(rank)], dtype=torch.float64))
        out.put((rank, total.tolist(), ud.all_ranks_agree(rank == 0), ud.all_ranks_agree(True),
                 ud.any_rank(rank == 1), ud.any_rank(False), ud.broadcast_object({"pid": 100 + rank})))
    finally:
        dist.destroy_process_group()


def test_collectives_on_two_ranks():
    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    mp.start_processes(_worker, args=(_free_port(), out), nprocs=2, start_method="spawn")
    results = sorted(out.get() for _ in range(2))
    for rank, total, some_false, all_true, some_true, none_true, obj in results:
        assert total == [2.0, 1.0]
        assert (some_false, all_true, some_true, none_true) == (False, True, True, False)
        assert obj == {"pid": 100}  # rank 0's object on both ranks


def test_collectives_without_a_group_are_the_identity():
    t = torch.tensor([3.0])
    assert ud.all_reduce_sum(t) is t
    assert ud.all_ranks_agree(False) is False and ud.any_rank(True) is True
    assert ud.broadcast_object([1]) == [1]
