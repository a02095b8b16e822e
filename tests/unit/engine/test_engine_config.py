"""build_ds_config: batch arithmetic, ZeRO stages, precisions, offload, deepspeed_extra merging."""

import dataclasses

import pytest

from udmtrain.config.schema import EngineSection

from udmtrain.engine.deepspeed_engine import build_ds_config


def Eng(**overrides):  # noqa: N802 - reads like the section it builds
    """The real ``engine:`` recipe section with this file's defaults."""
    return dataclasses.replace(EngineSection(zero_stage=2, precision="bf16", micro_batch_size=4, global_batch_size=32), **overrides)


def test_batch_arithmetic_derives_accumulation():
    cfg = build_ds_config(Eng(micro_batch_size=4, global_batch_size=32), world_size=2)
    assert (cfg["train_batch_size"], cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]) == (32, 4, 4)
    assert build_ds_config(Eng(micro_batch_size=4, global_batch_size=32), world_size=8)["gradient_accumulation_steps"] == 1


@pytest.mark.parametrize("global_bs,world", [(30, 2), (4, 2), (0, 1)])
def test_batch_arithmetic_rejects_non_multiples(global_bs, world):
    with pytest.raises(ValueError, match=rf"global_batch_size={global_bs} is not a positive multiple of micro_batch_size 4 x world_size {world} = {4 * world}"):
        build_ds_config(Eng(global_batch_size=global_bs), world_size=world)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_stage_and_precision(stage, precision):
    cfg = build_ds_config(Eng(zero_stage=stage, precision=precision, grad_clip=0.5), world_size=1)
    assert cfg["zero_optimization"] == {"stage": stage}
    assert cfg["bf16"] == {"enabled": precision == "bf16"}
    assert cfg["fp16"] == {"enabled": precision == "fp16"}
    assert cfg["gradient_clipping"] == 0.5
    assert cfg["steps_per_print"] >= 10**9
    assert "optimizer" not in cfg and "scheduler" not in cfg  # client torch AdamW + LambdaLR-style schedule


def test_bad_stage_and_precision():
    with pytest.raises(ValueError, match="engine.zero_stage=4"):
        build_ds_config(Eng(zero_stage=4), 1)
    with pytest.raises(ValueError, match="engine.precision='fp8'"):
        build_ds_config(Eng(precision="fp8"), 1)


def test_offload():
    cfg = build_ds_config(Eng(zero_stage=3, offload_optimizer=True, offload_param=True), 1)
    zero = cfg["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    assert cfg["zero_force_ds_cpu_optimizer"] is False
    assert "zero_force_ds_cpu_optimizer" not in build_ds_config(Eng(), 1)
    with pytest.raises(ValueError, match="offload_param needs engine.zero_stage=3"):
        build_ds_config(Eng(zero_stage=2, offload_param=True), 1)
    with pytest.raises(ValueError, match="offload_optimizer needs engine.zero_stage >= 1"):
        build_ds_config(Eng(zero_stage=0, offload_optimizer=True), 1)


def test_no_clipping_is_zero():
    assert build_ds_config(Eng(grad_clip=None), 1)["gradient_clipping"] == 0.0


def test_deepspeed_extra_deep_merges_and_guards_batch_keys():
    extra = {"zero_optimization": {"overlap_comm": True}, "activation_checkpointing": {"partition_activations": True}}
    cfg = build_ds_config(Eng(deepspeed_extra=extra), 1)
    assert cfg["zero_optimization"] == {"stage": 2, "overlap_comm": True}
    assert cfg["activation_checkpointing"] == {"partition_activations": True}
    assert build_ds_config(Eng(deepspeed_extra={"train_batch_size": 32}), 1)["train_batch_size"] == 32
    with pytest.raises(ValueError, match="deepspeed_extra.train_batch_size=64 contradicts the derived value 32"):
        build_ds_config(Eng(deepspeed_extra={"train_batch_size": 64}), 1)


def test_stale_jit_build_locks_are_removed_fresh_ones_kept(tmp_path, monkeypatch):
    # A killed first run leaves TORCH_EXTENSIONS_DIR/<op>/lock and torch would wait on it forever.
    import os
    import time

    from udmtrain.engine.deepspeed_engine import STALE_LOCK_SECONDS, remove_stale_build_locks

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("LOCAL_RANK", "0")
    stale, fresh = tmp_path / "deepspeed_shm_comm" / "lock", tmp_path / "other_op" / "lock"
    for lock in (stale, fresh):
        lock.parent.mkdir()
        lock.touch()
    old = time.time() - STALE_LOCK_SECONDS - 60
    os.utime(stale, (old, old))
    assert remove_stale_build_locks() == [str(stale)]
    assert not stale.exists() and fresh.exists()
