"""AdamW builder and the closed-form LR schedules (values, registry, exact state round trip)."""

import math

import pytest
import torch

from udmtrain.engine.optim import AdamWBuilder, ConstantWarmupLR, CosineLR, build_lr_schedule, build_optimizer
from udmtrain.registry import LR_SCHEDULE, OPTIMIZER


def _opt(lr=1.0):
    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=lr)


def _lrs(sched, n):
    out = []
    for _ in range(n):
        out.append(sched.get_last_lr()[0])
        sched.optimizer.step()
        sched.step()
    return out


def test_registry_names():
    assert OPTIMIZER.get("adamw") is AdamWBuilder
    assert LR_SCHEDULE.get("constant_warmup") is ConstantWarmupLR and LR_SCHEDULE.get("cosine") is CosineLR


def test_adamw_builder_is_plain_torch_adamw():
    cfg = AdamWBuilder.Config(lr=1e-3, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.1)
    opt = build_optimizer("adamw", cfg)([torch.nn.Parameter(torch.ones(3))])
    assert type(opt) is torch.optim.AdamW  # exact type: DeepSpeed ZeRO's supported list
    g = opt.param_groups[0]
    assert (g["lr"], g["betas"], g["eps"], g["weight_decay"], g["fused"]) == (1e-3, (0.8, 0.9), 1e-6, 0.1, False)


def test_constant_warmup_values():
    sched = ConstantWarmupLR(ConstantWarmupLR.Config(warmup_steps=4), _opt(2.0))
    assert _lrs(sched, 6) == [0.5, 1.0, 1.5, 2.0, 2.0, 2.0]
    assert _lrs(ConstantWarmupLR(ConstantWarmupLR.Config(warmup_steps=0), _opt(2.0)), 2) == [2.0, 2.0]


def test_cosine_values():
    cfg = CosineLR.Config(warmup_steps=2, min_lr=0.1, decay_steps=6)
    got = _lrs(build_lr_schedule("cosine", cfg, max_steps=100)(_opt(1.0)), 8)
    want = [0.5, 1.0] + [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - 2) / 4)) for s in range(2, 6)] + [0.1, 0.1]
    assert got == pytest.approx(want, abs=1e-15)
    # decay_steps=None -> train.max_steps
    assert CosineLR(CosineLR.Config(warmup_steps=0), _opt(), max_steps=10).decay_steps == 10


def test_cosine_rejects_bad_horizon():
    with pytest.raises(ValueError, match="decay_steps=3 must exceed warmup_steps=5"):
        CosineLR(CosineLR.Config(warmup_steps=5, decay_steps=3), _opt())
    with pytest.raises(ValueError, match="needs decay_steps or train.max_steps"):
        CosineLR(CosineLR.Config(warmup_steps=5), _opt())


def test_state_round_trip_is_exact_and_excludes_config():
    a = CosineLR(CosineLR.Config(warmup_steps=3, decay_steps=20), _opt())
    _lrs(a, 7)
    state = a.state_dict()
    assert set(state) <= {"last_epoch", "base_lrs", "_last_lr", "_step_count"}
    b = CosineLR(CosineLR.Config(warmup_steps=3, decay_steps=20), _opt())
    b.load_state_dict(state)
    assert b.optimizer.param_groups[0]["lr"] == a.optimizer.param_groups[0]["lr"]
    assert _lrs(b, 5) == _lrs(a, 5)
