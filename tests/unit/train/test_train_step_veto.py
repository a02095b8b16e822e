"""The non-finite veto of ``TrainStep`` with a real DeepSpeed engine (gloo, CPU, one in-process rank).

A network that returns NaN logits on demand (a differentiable NaN: the backward fills the gradients
with NaN, as a real blow-up would), or an objective whose loss is NaN while its gradients stay finite
(which ZeRO's own overflow check cannot see), makes one optimizer step non-finite. The step must leave the
weights, Adam's moments and step count and the EMA bitwise unchanged and report ``skipped``; the next
finite step must then produce exactly the weights of a run that never saw the poisoned step.
"""

from __future__ import annotations

import pytest
import torch

from udmtrain.config import load_recipe
from udmtrain.engine import deepspeed_engine as dse
from udmtrain.engine.optim import build_lr_schedule, build_optimizer
from udmtrain.models.ema import EMA
from udmtrain.train.build import TrainStep, build_components, make_skippable, skip_with_optimizer
from udmtrain.train.metrics import StepTimer

VOCAB, SEQ = 37, 16


class _Plan:
    """Poison schedule shared by the wrappers: each call pops the next flag (empty plan = healthy)."""

    def __init__(self) -> None:
        self.plan: list[bool] = []

    def _poison_now(self) -> bool:
        return self.plan.pop(0) if self.plan else False


class PoisonableNetwork(torch.nn.Module, _Plan):
    """``inner`` unchanged, except that a call whose plan flag is True returns NaN logits: a
    differentiable NaN, so the backward fills every reachable gradient with NaN."""

    def __init__(self, inner: torch.nn.Module) -> None:
        torch.nn.Module.__init__(self)
        _Plan.__init__(self)
        self.inner = inner

    def forward(self, *args):
        logits_BLV = self.inner(*args)
        return logits_BLV * float("nan") if self._poison_now() else logits_BLV


class PoisonableObjective(_Plan):
    """``objective`` unchanged, except that a call whose plan flag is True adds a constant NaN to the
    loss (and its logged sum): the loss is non-finite while every gradient stays finite, so DeepSpeed's own overflow
    check (ZeRO >= 1) sees nothing and only ``TrainStep``'s veto can stop the update."""

    def __init__(self, objective) -> None:
        super().__init__()
        self.objective = objective

    def __call__(self, *args):
        out = self.objective(*args)
        if not self._poison_now():
            return out
        return out._replace(loss=out.loss + float("nan"), loss_sum=out.loss_sum + float("nan"))


def _cfg(stage: int, warmup_steps: int):
    return load_recipe("recipes/quickstart.yaml", [
        "model.hidden_size=32", "model.num_blocks=1", "model.num_heads=2", "model.cond_dim=16",
        f"data.seq_len={SEQ}", "engine.micro_batch_size=2", "engine.global_batch_size=4",  # 2 micro-batches
        "engine.precision=fp32", f"engine.zero_stage={stage}", f"lr_schedule.warmup_steps={warmup_steps}",
        "optim.lr=1e-2", "train.ema_decay=0"])


def _setup(stage: int, warmup_steps: int = 0):
    """(TrainStep, engine, client optimizer, EMA, poisons) from one seed: identical on every call;
    ``poisons`` maps "logits" to the network wrapper and "loss" to the objective wrapper."""
    cfg = _cfg(stage, warmup_steps)
    torch.manual_seed(0)
    components = build_components(cfg, VOCAB, with_sampler=False)
    net = PoisonableNetwork(components.model)
    created = []
    builder = build_optimizer(cfg.optim.name, cfg.optim.cfg, device="cpu")

    def make_optimizer(params):
        created.append(make_skippable(builder(params)))
        return created[-1]

    schedule = build_lr_schedule(cfg.lr_schedule.name, cfg.lr_schedule.cfg, cfg.train.max_steps)
    engine = dse.create_engine(net, make_optimizer, lambda opt: skip_with_optimizer(schedule(opt), opt),
                               dse.build_ds_config(cfg.engine, 1))
    ema = EMA(engine.module, decay=0.5)
    objective = PoisonableObjective(components.objective)
    step_fn = TrainStep(engine=engine, objective=objective, components=components, cfg=cfg, rank=0,
                        world_size=1, device=torch.device("cpu"), timer=StepTimer(), optimizer=created[0], ema=ema)
    assert step_fn.accumulation == 2
    return step_fn, engine, created[0], ema, {"logits": net, "loss": objective}


def _micro_batches(step: int):
    """The 2 micro-batches of optimizer step ``step`` (a function of ``step`` only)."""
    g = torch.Generator().manual_seed(100 + step)
    for _ in range(2):
        valid_BL = torch.ones(2, SEQ, dtype=torch.bool)
        valid_BL[1, SEQ - 3:] = False  # some padding, as packed shards have at a document's end
        yield {"input_ids": torch.randint(0, VOCAB, (2, SEQ), generator=g), "valid": valid_BL}


def _snapshot(engine, optimizer, ema) -> dict[str, torch.Tensor]:
    """Module weights, the optimizer's own parameters (ZeRO: the fp32 partitions) and every state
    tensor (exp_avg, exp_avg_sq, step), and the EMA shadow: all cloned."""
    out = {f"module/{k}": p.detach().clone() for k, p in engine.module.named_parameters()}
    for gi, group in enumerate(optimizer.param_groups):
        for pi, p in enumerate(group["params"]):
            out[f"opt/{gi}/{pi}/param"] = p.detach().clone()
            for key, value in optimizer.state.get(p, {}).items():
                if torch.is_tensor(value):
                    out[f"opt/{gi}/{pi}/{key}"] = value.detach().clone()
    for key, value in ema.state_dict().items():
        if torch.is_tensor(value):
            out[f"ema/{key}"] = value.clone()
        elif isinstance(value, dict):
            out.update({f"ema/{key}/{k}": v.clone() for k, v in value.items() if torch.is_tensor(v)})
    return out


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bits (NaN == NaN when the bit patterns agree)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        a, b = a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)
    return torch.equal(a, b)


def _assert_same(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), f"{what}: keys differ: {sorted(set(a) ^ set(b))[:5]}"
    for key in a:
        assert _bitwise_equal(a[key], b[key]), f"{what}: {key} changed"


def _run(step_fn, step: int):
    return step_fn(iter(list(_micro_batches(step))), step)


POISONS = {
    # (which wrapper, plan over the step's 2 micro-batches)
    "nan-logits-both-micros": ("logits", [True, True]),
    "nan-logits-first-micro": ("logits", [True, False]),  # one bad micro-batch vetoes the whole step
    "nan-loss-finite-grads-last-micro": ("loss", [False, True]),
}


@pytest.mark.parametrize("stage", [0, 2])
@pytest.mark.parametrize("poison", list(POISONS))
def test_vetoed_step_leaves_weights_adam_state_and_ema_bitwise_unchanged(dist_group, stage, poison):
    step_fn, engine, optimizer, ema, poisons = _setup(stage)
    initial = _snapshot(engine, optimizer, ema)
    first = _run(step_fn, 0)
    assert not first.skipped and torch.isfinite(torch.tensor(first.loss))
    before = _snapshot(engine, optimizer, ema)
    assert any(k.endswith("/exp_avg_sq") for k in before) and any(k.endswith("/step") for k in before)
    assert all(torch.isfinite(v).all() for v in before.values() if v.is_floating_point())

    which, plan = POISONS[poison]
    poisons[which].plan = list(plan)
    vetoed = _run(step_fn, 1)
    assert poisons[which].plan == []
    assert vetoed.skipped and vetoed.loss != vetoed.loss  # the NaN loss is reported, not hidden
    assert vetoed.num_tokens == 2 * (2 * SEQ - 3)
    assert vetoed.grad_norm is None
    _assert_same(before, _snapshot(engine, optimizer, ema), "after the vetoed step")
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in engine.module.parameters()), \
        "a NaN gradient was left behind for the next step to accumulate into"

    after = _run(step_fn, 2)
    assert not after.skipped and torch.isfinite(torch.tensor(after.loss))
    assert optimizer.skip_next is False
    assert after.grad_norm is not None and after.grad_norm > 0 and after.lr > 0
    updated = _snapshot(engine, optimizer, ema)
    weights = [k for k in before if k.startswith("module/")]
    trained_by_step_0 = [k for k in weights if not torch.equal(initial[k], before[k])]
    trained_by_step_2 = [k for k in weights if not torch.equal(before[k], updated[k])]
    # the DiT's output layer starts at zero (adaLN-zero), so step 0 moves only that layer
    assert trained_by_step_0 and set(trained_by_step_0) < set(trained_by_step_2), trained_by_step_2

    # A run that never saw step 1 reaches exactly the same state (constant LR: warmup_steps=0):
    # no gradient, moment, Adam step count or EMA trace of the vetoed step survives.
    ref_fn, ref_engine, ref_optimizer, ref_ema, _ = _setup(stage)
    _run(ref_fn, 0)
    _run(ref_fn, 2)
    _assert_same(_snapshot(ref_engine, ref_optimizer, ref_ema), updated, "vetoed run vs. a run without the step")


@pytest.mark.parametrize("stage, which, client_veto", [
    (0, "logits", True),   # stage 0 fp32: only the client optimizer's veto acts; DeepSpeed sees a normal step
    (2, "loss", True),     # finite gradients: DeepSpeed sees no overflow, the client veto acts
    (2, "logits", False),  # NaN gradients: ZeRO's own overflow check skips the step and the LR scheduler
])
def test_lr_schedule_position_after_a_vetoed_step(dist_group, stage, which, client_veto):
    """``constant_warmup`` with 4 warmup steps: ``lr = 1e-2 * min(1, (s + 1) / 4)`` after ``s`` scheduler
    steps. A vetoed step never moves the schedule, whoever vetoed it (``skip_with_optimizer``)."""
    step_fn, engine, optimizer, _, poisons = _setup(stage, warmup_steps=4)
    _run(step_fn, 0)
    assert engine.get_lr()[0] == pytest.approx(1e-2 * 2 / 4)
    poisons[which].plan = [True, True]
    assert _run(step_fn, 1).skipped
    assert engine.get_lr()[0] == pytest.approx(1e-2 * 2 / 4)
    assert all(state["step"].item() == 1 for state in optimizer.state.values())  # Adam counted one update
    assert optimizer.vetoed is False  # consumed by the scheduler when the client veto acted
    assert optimizer.skip_next is (not client_veto)  # consumed by the client veto, left set when DeepSpeed skipped
    _run(step_fn, 2)  # the next finite step advances the schedule by exactly one
    assert engine.get_lr()[0] == pytest.approx(1e-2 * 3 / 4)
