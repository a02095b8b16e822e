"""Exact resume through the real launchers: 4 steps straight == 2 steps + stop + ``checkpoint.resume=auto``
+ 2 steps, bit for bit (per-step losses, every tensor of the DeepSpeed shards: weights, fp32 master
partitions, Adam moments; EMA; the data cursor), for ZeRO 1 (1 process, fp32), ZeRO 2 (2 ranks,
``deepspeed --num_gpus 2``, fp32) and ZeRO 3 (2 ranks, bf16, the straight run under ``torchrun``); and
with dropout on (the paper's 0.1), whose masks come from the RNG states the checkpoint restores, for 1
and 2 ranks.
"""

from __future__ import annotations

import json

from pathlib import Path

import pytest

import train_helpers as th
from conftest import RESUME_1RANK

STEPS, HALF = 4, 2


def _split_run(tiny_data: Path, runs_root: Path, name: str, extra: tuple[str, ...], launcher: str, nproc: int):
    """First half (max_steps=HALF), then the same command with max_steps=STEPS resuming from it.
    Returns (run_dir, rank states at the stop, stdout of the resumed run)."""
    run_dir = runs_root / name
    first = th.run("recipes/quickstart.yaml", th.tiny_overrides(tiny_data, runs_root, name, *extra,
                                                               f"train.max_steps={HALF}"), launcher, nproc)
    th.check_ok(first, run_dir, HALF)
    at_stop = [th.rank_state(th.step_dir(run_dir, HALF), r) for r in range(nproc)]
    second = th.run("recipes/quickstart.yaml", th.tiny_overrides(tiny_data, runs_root, name, *extra,
                                                                f"train.max_steps={STEPS}", "checkpoint.resume=auto"),
                    launcher, nproc)
    th.check_ok(second, run_dir, STEPS)
    assert f"resuming from {th.step_dir(run_dir, HALF)}" in second.stdout, th.describe(second)
    return run_dir, at_stop, second


def _assert_equivalent(straight: Path, resumed: Path, nproc: int) -> None:
    a, b = th.losses(straight), th.losses(resumed)
    assert sorted(a) == list(range(1, STEPS + 1)), a
    assert a == b, f"per-step losses differ:\nstraight {a}\nresumed  {b}"
    sa, sb = th.step_dir(straight, STEPS), th.step_dir(resumed, STEPS)
    for d in (sa, sb):
        meta = json.loads((d / "meta.json").read_text())
        assert (meta["world_size"], meta["step"]) == (nproc, STEPS), meta
        assert {f"rank{r}_state.pt" for r in range(nproc)} <= {p.name for p in d.iterdir()}
    th.assert_same_tensors(th.ds_tensors(sa), th.ds_tensors(sb), "DeepSpeed shards at the last step")
    for rank in range(nproc):
        ra, rb = th.rank_state(sa, rank), th.rank_state(sb, rank)
        assert ra["data_cursor"] == rb["data_cursor"], rank
        assert (ra["step"], ra["tokens_seen"]) == (rb["step"], rb["tokens_seen"]) == (STEPS, ra["tokens_seen"])
    ema_a, ema_b = th.rank_state(sa, 0)["ema"], th.rank_state(sb, 0)["ema"]
    assert ema_a is not None and ema_a["num_updates"] == ema_b["num_updates"] == STEPS
    th.assert_same_tensors(th.flat_tensors(ema_a), th.flat_tensors(ema_b), "EMA")


def _sample_ids(loader, n: int) -> list[str]:
    return [key for _ in range(n) for key in next(loader)["sample_ids"]]


def test_resume_1rank_zero1_fp32_is_exact(tiny_data, runs_root, straight_1rank):
    resumed, at_stop, _ = _split_run(tiny_data, runs_root, "split1", RESUME_1RANK, "python", 1)
    _assert_equivalent(straight_1rank, resumed, 1)
    # The data cursor: the resumed loader continues exactly where the stopped one was, never repeating
    # a sample of the first half (the stream of the real loader with its worker process).
    from udmtrain.config import load_recipe
    from udmtrain.data.loader import build_train_loader

    cfg = load_recipe(str(th.REPO / "recipes/quickstart.yaml"), th.tiny_overrides(tiny_data, runs_root, "x", *RESUME_1RANK))
    micro, accum = cfg.engine.micro_batch_size, cfg.engine.global_batch_size // cfg.engine.micro_batch_size
    fresh = build_train_loader(cfg.data, micro, 0, 1, cfg.run.seed)
    seen_first, seen_second = _sample_ids(fresh, HALF * accum), _sample_ids(fresh, HALF * accum)
    fresh.close()
    again = build_train_loader(cfg.data, micro, 0, 1, cfg.run.seed)
    again.load_state_dict(at_stop[0]["data_cursor"])
    after_resume = _sample_ids(again, HALF * accum)
    again.close()
    assert after_resume == seen_second
    assert not set(seen_first) & set(after_resume)
    assert len(set(seen_first + after_resume)) == STEPS * accum * micro


def test_resume_2ranks_zero2_deepspeed_is_exact(tiny_data, runs_root):
    extra = ("engine.zero_stage=2", "engine.global_batch_size=8")  # 2 micro-batches per rank per step
    straight = runs_root / "straight_z2"
    proc = th.run("recipes/quickstart.yaml", th.tiny_overrides(tiny_data, runs_root, "straight_z2", *extra,
                                                              f"train.max_steps={STEPS}"), "deepspeed", 2)
    th.check_ok(proc, straight, STEPS)
    resumed, at_stop, _ = _split_run(tiny_data, runs_root, "split_z2", extra, "deepspeed", 2)
    _assert_equivalent(straight, resumed, 2)
    # each rank has its own cursor; ranks read disjoint shards
    assert [s["data_cursor"]["rank"] for s in at_stop] == [0, 1]


@pytest.mark.parametrize("precision", ["bf16"])
def test_resume_2ranks_zero3_torchrun_is_exact(tiny_data, runs_root, precision):
    extra = ("engine.zero_stage=3", f"engine.precision={precision}")
    straight = runs_root / "straight_z3"
    proc = th.run("recipes/quickstart.yaml", th.tiny_overrides(tiny_data, runs_root, "straight_z3", *extra,
                                                              f"train.max_steps={STEPS}"), "torchrun", 2)
    th.check_ok(proc, straight, STEPS)
    resumed, _, _ = _split_run(tiny_data, runs_root, "split_z3", extra, "deepspeed", 2)
    _assert_equivalent(straight, resumed, 2)


@pytest.mark.parametrize("nproc,launcher,extra", [
    (1, "python", RESUME_1RANK), (2, "deepspeed", ("engine.zero_stage=2", "engine.global_batch_size=8"))],
    ids=["1rank", "2ranks"])
def test_resume_with_dropout_is_exact(tiny_data, runs_root, nproc, launcher, extra):
    # nothing may draw from the global RNG between the restore of its state and the first step
    extra = (*extra, "model.dropout=0.1")
    straight = runs_root / f"straight_dropout{nproc}"
    proc = th.run("recipes/quickstart.yaml", th.tiny_overrides(tiny_data, runs_root, straight.name, *extra,
                                                              f"train.max_steps={STEPS}"), launcher, nproc)
    th.check_ok(proc, straight, STEPS)
    resumed, _, _ = _split_run(tiny_data, runs_root, f"split_dropout{nproc}", extra, launcher, nproc)
    _assert_equivalent(straight, resumed, nproc)
