"""Optimizer and learning-rate schedules (registries ``optimizer`` and ``lr_schedule``).

The optimizer is always a plain ``torch.optim.AdamW``: DeepSpeed's ZeRO accepts it by exact type
(``ZERO_SUPPORTED_OPTIMIZERS``) and, unlike DeepSpeed's config ``AdamW`` (FusedAdam), it needs no JIT
build (~53 s on CPU, nvcc on CUDA). ``fused=None`` picks torch's fused kernel on CUDA.

The schedules are closed-form functions of the optimizer step count ``s`` (no chained updates), so a
resumed run recomputes exactly the same learning rate from ``last_epoch`` alone:

* ``constant_warmup``: ``lr(s) = lr * min(1, (s + 1) / warmup_steps)``
* ``cosine``: warmup as above, then ``lr(s) = min_lr + (lr - min_lr) * (1 + cos(pi * p)) / 2`` with
  ``p = clamp((s - warmup) / (decay_steps - warmup), 0, 1)``.

``s`` counts optimizer steps already taken (DeepSpeed calls ``scheduler.step()`` after each
optimizer step), so the first update uses ``lr / warmup_steps``, never 0.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler

from udmtrain.registry import LR_SCHEDULE, OPTIMIZER


@OPTIMIZER.register("adamw")
class AdamWBuilder:
    """Builds ``torch.optim.AdamW`` (decoupled weight decay, Loshchilov & Hutter 2019, Alg. 2).

    ``OPTIMIZER.build("adamw", cfg)(params, device)`` -> ``torch.optim.AdamW``. The builder is also a
    valid ``optimizer`` argument of ``deepspeed.initialize`` (a callable of the parameters).
    """

    @dataclass(kw_only=True, frozen=True)
    class Config:
        lr: float = 3e-4
        """Peak learning rate (the schedules multiply it by a factor in [0, 1])."""
        betas: tuple[float, float] = (0.9, 0.999)
        """Adam moment decay rates (beta1, beta2)."""
        eps: float = 1e-8
        """Adam denominator epsilon."""
        weight_decay: float = 0.0
        """Decoupled weight decay, applied to every parameter."""
        fused: bool | None = None
        """torch's fused AdamW kernel; None = on when the parameters live on CUDA."""

    def __init__(self, cfg: Config, device: torch.device | str | None = None) -> None:
        if not (cfg.lr > 0 and math.isfinite(cfg.lr)):  # torch accepts lr=0 and reports nan obscurely
            raise ValueError(f"optim.lr must be a positive finite number, got {cfg.lr}")
        self.cfg = cfg
        self.device = torch.device(device) if device is not None else None

    def __call__(self, params: Iterable[Any]) -> torch.optim.AdamW:
        """The optimizer over ``params`` (tensors or param-group dicts)."""
        params = list(params)
        fused = self.cfg.fused
        if fused is None:
            device = self.device or _first_device(params)
            fused = device is not None and device.type == "cuda"
        return torch.optim.AdamW(
            params,
            lr=self.cfg.lr,
            betas=tuple(self.cfg.betas),
            eps=self.cfg.eps,
            weight_decay=self.cfg.weight_decay,
            fused=bool(fused),
        )


def _first_device(params: list[Any]) -> torch.device | None:
    for p in params:
        tensors = p["params"] if isinstance(p, dict) else [p]
        for t in tensors:
            return t.device
    return None


class _ClosedFormLR(LRScheduler):
    """Base: ``lr_i(s)`` a closed-form function of the step ``s``; the state is only the position.

    ``state_dict`` deliberately excludes the config and the base LRs, so a resumed run keeps the
    *current* recipe's schedule and peak LR (``optim.lr``); only ``last_epoch`` comes from the
    checkpoint.
    """

    _STATE_KEYS = ("last_epoch", "_step_count")

    def lrs_at(self, step: int) -> list[float]:  # pragma: no cover - abstract
        """Learning rate of every param group after ``step`` optimizer steps."""
        raise NotImplementedError

    def get_lr(self) -> list[float]:
        return self.lrs_at(self.last_epoch)

    def state_dict(self) -> dict[str, Any]:
        return {k: self.__dict__[k] for k in self._STATE_KEYS if k in self.__dict__}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.__dict__.update({k: v for k, v in state_dict.items() if k in self._STATE_KEYS})
        # Re-derive the optimizer's LR so it matches the loaded position exactly.
        for group, lr in zip(self.optimizer.param_groups, self.lrs_at(self.last_epoch)):
            group["lr"] = lr
        self._last_lr = [g["lr"] for g in self.optimizer.param_groups]


def apply_hyperparameters(optimizer: torch.optim.Optimizer, cfg: Any) -> None:
    """Write the recipe's AdamW settings into ``optimizer``'s param groups (after a checkpoint load).

    ``Optimizer.load_state_dict`` restores the saved ``param_groups``, so without this a resumed run
    would silently keep the old ``betas``/``eps``/``weight_decay`` and peak LR (``initial_lr``)
    whatever the recipe says; the moments and step counts are kept.
    """
    for group in optimizer.param_groups:
        group.update(betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay, initial_lr=cfg.lr)


def _warmup(step: int, warmup_steps: int) -> float:
    """Linear warmup factor ``min(1, (s + 1) / W)`` (1 when W == 0)."""
    return 1.0 if warmup_steps <= 0 else min(1.0, (step + 1) / warmup_steps)


@LR_SCHEDULE.register("constant_warmup")
class ConstantWarmupLR(_ClosedFormLR):
    """Linear warmup to the peak LR over ``warmup_steps`` optimizer steps, then constant."""

    @dataclass(kw_only=True, frozen=True)
    class Config:
        warmup_steps: int = 2500
        """Optimizer steps of linear warmup (0 = none)."""

    def __init__(self, cfg: Config, optimizer: torch.optim.Optimizer, max_steps: int | None = None):
        self.cfg = cfg
        super().__init__(optimizer)

    def lrs_at(self, step: int) -> list[float]:
        return [base * _warmup(step, self.cfg.warmup_steps) for base in self.base_lrs]


@LR_SCHEDULE.register("cosine")
class CosineLR(_ClosedFormLR):
    """Linear warmup, then half-cosine decay from the peak LR to ``min_lr`` at ``decay_steps``."""

    @dataclass(kw_only=True, frozen=True)
    class Config:
        warmup_steps: int = 2500
        """Optimizer steps of linear warmup (0 = none)."""
        min_lr: float = 0.0
        """Absolute learning rate reached at ``decay_steps`` and kept afterwards."""
        decay_steps: int | None = None
        """Step at which the decay ends; None = ``train.max_steps``."""

    def __init__(self, cfg: Config, optimizer: torch.optim.Optimizer, max_steps: int | None = None):
        self.cfg = cfg
        self.decay_steps = cfg.decay_steps if cfg.decay_steps is not None else max_steps
        if self.decay_steps is None:
            raise ValueError("lr_schedule 'cosine' needs decay_steps or train.max_steps")
        if self.decay_steps <= cfg.warmup_steps:
            raise ValueError(
                f"lr_schedule 'cosine': decay_steps={self.decay_steps} must exceed "
                f"warmup_steps={cfg.warmup_steps}; lower lr_schedule.warmup_steps, or raise lr_schedule.decay_steps "
                "(default: train.max_steps)"
            )
        super().__init__(optimizer)

    def lrs_at(self, step: int) -> list[float]:
        # min_lr is absolute, so it is applied per group rather than as a factor.
        s, w = step, self.cfg.warmup_steps
        if s < w:
            return [base * _warmup(s, w) for base in self.base_lrs]
        p = min(1.0, (s - w) / (self.decay_steps - w))
        c = 0.5 * (1.0 + math.cos(math.pi * p))
        return [self.cfg.min_lr + (base - self.cfg.min_lr) * c for base in self.base_lrs]


def build_optimizer(name: str, cfg: Any, device: torch.device | str | None = None) -> AdamWBuilder:
    """The registered optimizer builder ``name`` (a callable ``params -> torch.optim.Optimizer``)."""
    return OPTIMIZER.build(name, cfg, device=device)


def build_lr_schedule(name: str, cfg: Any, max_steps: int | None):
    """A callable ``optimizer -> LRScheduler`` for ``deepspeed.initialize(lr_scheduler=...)``."""

    def make(optimizer: torch.optim.Optimizer) -> LRScheduler:
        return LR_SCHEDULE.build(name, cfg, optimizer=optimizer, max_steps=max_steps)

    return make
