"""Real DeepSpeed (gloo, CPU, one in-process rank): straight vs save/fresh-engine/load runs agree bitwise."""

import dataclasses

import pytest

from udmtrain.config.schema import EngineSection
import torch

from udmtrain.engine import deepspeed_engine as dse
from udmtrain.engine.optim import AdamWBuilder, CosineLR, build_lr_schedule

D_IN, D_HID, D_OUT = 8, 16, 4


def Eng(**overrides):  # noqa: N802 - reads like the section it builds
    """The real ``engine:`` recipe section with this file's defaults."""
    return dataclasses.replace(EngineSection(zero_stage=0, precision="fp32", micro_batch_size=2, global_batch_size=4), **overrides)


def _engine(stage, precision="fp32", init_seed=0, global_bs=4):
    torch.manual_seed(init_seed)
    model = torch.nn.Sequential(torch.nn.Linear(D_IN, D_HID), torch.nn.GELU(), torch.nn.Linear(D_HID, D_OUT))
    cfg = dse.build_ds_config(Eng(zero_stage=stage, precision=precision, global_batch_size=global_bs), world_size=1)
    sched = build_lr_schedule("cosine", CosineLR.Config(warmup_steps=2, min_lr=1e-4, decay_steps=8), max_steps=8)
    return dse.create_engine(model, AdamWBuilder(AdamWBuilder.Config(lr=1e-2, weight_decay=0.01)), sched, cfg)


def _batch(step, micro, dtype=torch.float32):
    g = torch.Generator().manual_seed(1000 * step + micro)
    return torch.randn(2, D_IN, generator=g).to(dtype), torch.randn(2, D_OUT, generator=g).to(dtype)


def _train(engine, start, stop, dtype=torch.float32):
    """Optimizer steps [start, stop); returns per-micro-batch losses, LRs and grad norms."""
    losses, lrs, norms = [], [], []
    for step in range(start, stop):
        for micro in range(engine.gradient_accumulation_steps()):
            x, y = _batch(step, micro, dtype)
            loss = (engine(x).float() - y.float()).pow(2).mean()
            engine.backward(loss)
            losses.append(loss.item())
            norm = dse.step(engine)
        norms.append(norm)
        lrs.append(engine.get_lr()[0])
    return losses, lrs, norms


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_resume_is_bit_identical(dist_group, tmp_path, stage):
    straight = _engine(stage)
    losses, lrs, norms = _train(straight, 0, 6)
    assert all(n is not None and n > 0 for n in norms)
    want = dse.full_state_dict(straight.module)

    first = _engine(stage)
    l1, r1, _ = _train(first, 0, 3)
    dse.save(first, tmp_path, client_state={"step": 3})
    del first
    second = _engine(stage, init_seed=123)  # a different init: everything must come from the checkpoint
    assert dse.load(second, tmp_path)["step"] == 3
    l2, r2, _ = _train(second, 3, 6)

    assert l1 + l2 == losses
    assert r1 + r2 == lrs
    got = dse.full_state_dict(second.module)
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("stage", [0, 2])
def test_grad_norm_matches_manual_pre_clip_norm(dist_group, stage):
    engine = _engine(stage, global_bs=2)  # no accumulation
    replica = torch.nn.Sequential(torch.nn.Linear(D_IN, D_HID), torch.nn.GELU(), torch.nn.Linear(D_HID, D_OUT))
    replica.load_state_dict(dse.full_state_dict(engine.module))
    x, y = _batch(0, 0)
    (replica(x) - y).pow(2).mean().backward()
    want = torch.stack([p.grad.double().pow(2).sum() for p in replica.parameters()]).sum().sqrt().item()
    engine.backward((engine(x) - y).pow(2).mean())
    assert dse.step(engine) == pytest.approx(want, rel=1e-5)


def test_bf16_engine_step_on_cpu(dist_group):
    engine = _engine(2, precision="bf16")
    before = dse.full_state_dict(engine.module)
    losses, _, norms = _train(engine, 0, 2, dtype=torch.bfloat16)
    assert next(engine.module.parameters()).dtype == torch.bfloat16
    assert all(torch.isfinite(torch.tensor(losses))) and norms[-1] > 0
    after = dse.full_state_dict(engine.module)
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_load_missing_checkpoint_is_clear(dist_group, tmp_path):
    with pytest.raises(FileNotFoundError, match="no DeepSpeed checkpoint"):
        dse.load(_engine(0), tmp_path)


def test_single_rank_stage0_skips_the_identity_allreduce_and_keeps_exact_gradients(dist_group):
    engine = _engine(0)  # 2 micro-batches per step: DeepSpeed scales each loss by 1/2
    assert engine.enable_backward_allreduce is False  # one data-parallel rank: nothing to average
    assert _engine(1).enable_backward_allreduce is True  # ZeRO >= 1 moves gradients into partitions there
    replica = torch.nn.Sequential(torch.nn.Linear(D_IN, D_HID), torch.nn.GELU(), torch.nn.Linear(D_HID, D_OUT))
    replica.load_state_dict(dse.full_state_dict(engine.module))
    for micro in range(2):
        x, y = _batch(0, micro)
        ((replica(x) - y).pow(2).mean() / 2).backward()
        engine.backward((engine(x) - y).pow(2).mean())
    for (name, p), q in zip(engine.module.named_parameters(), replica.parameters()):
        assert torch.equal(p.grad, q.grad), name
