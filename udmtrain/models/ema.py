"""Exponential moving average of a model's parameters (docs/theory.md §6: decay 0.9999 with warm-up).

After the n-th call of ``update`` (n = 1, 2, ...)::

    d_n = min(decay, (1 + n) / (10 + n))
    shadow <- d_n * shadow + (1 - d_n) * param

The shadow is an fp32 copy of every parameter, on the parameter's device, initialised to the
model's parameters at construction. Buffers are not averaged (the udmtrain models have none that
are persistent).

ZeRO: ``update`` and ``swap_into`` need the *full* parameters. Under ZeRO-3 the local parameter
tensors are empty placeholders: the trainer must gather them first (e.g. DeepSpeed's
``GatheredParameters``); ``update`` raises instead of silently averaging placeholders. ZeRO 1/2
keep full parameters on every rank and need nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


class EMA:
    """fp32 EMA shadow of ``model``'s named parameters; ``Stateful`` (state_dict / load_state_dict)."""

    def __init__(self, model: nn.Module, decay: float = 0.9999) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.num_updates = 0
        self.shadow: dict[str, torch.Tensor] = {
            name: p.detach().float().clone() for name, p in self._params(model).items()
        }

    @staticmethod
    def _params(model: nn.Module) -> dict[str, torch.Tensor]:
        return dict(model.named_parameters())

    def current_decay(self) -> float:
        """Decay used by the *next* update: ``min(decay, (1 + n) / (10 + n))`` with n = num_updates + 1."""
        n = self.num_updates + 1
        return min(self.decay, (1 + n) / (10 + n))

    def _check(self, params: dict[str, torch.Tensor]) -> None:
        if params.keys() != self.shadow.keys():
            missing, extra = sorted(self.shadow.keys() - params.keys()), sorted(params.keys() - self.shadow.keys())
            raise KeyError(
                f"EMA: parameter names differ from the model (missing {missing[:5]}, unexpected {extra[:5]})"
            )
        for name, p in params.items():
            if p.shape != self.shadow[name].shape:
                hint = " (ZeRO-3 partitioned? gather the parameters first)" if p.numel() == 0 else ""
                raise RuntimeError(
                    f"EMA: parameter {name!r} has shape {tuple(p.shape)}, "
                    f"the shadow {tuple(self.shadow[name].shape)}{hint}"
                )

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step: ``shadow <- d shadow + (1 - d) param`` with the warm-up decay ``d``."""
        params = self._params(model)
        self._check(params)
        decay = self.current_decay()
        self.num_updates += 1
        for name, p in params.items():
            if self.shadow[name].device != p.device:
                self.shadow[name] = self.shadow[name].to(p.device)
        # One multi-tensor kernel per operation instead of two small kernels per parameter tensor (the
        # per-tensor launches dominated at small model sizes); the same arithmetic, element by element.
        shadows = [self.shadow[name] for name in params]
        torch._foreach_mul_(shadows, decay)
        torch._foreach_add_(shadows, [p.detach().float() for p in params.values()], alpha=1.0 - decay)

    @contextlib.contextmanager
    def swap_into(self, model: nn.Module) -> Iterator[nn.Module]:
        """Within the block ``model`` holds the EMA weights (cast to each parameter's dtype); the
        original parameters are restored bit-exactly on exit, also after an exception."""
        params = self._params(model)
        self._check(params)
        backup = {name: p.detach().clone() for name, p in params.items()}
        try:
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(self.shadow[name])
            yield model
        finally:
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(backup[name])

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite ``model``'s parameters with the EMA weights (e.g. to export them)."""
        params = self._params(model)
        self._check(params)
        for name, p in params.items():
            p.copy_(self.shadow[name])

    def state_dict(self) -> dict[str, Any]:
        """``{"decay", "num_updates", "shadow": {name: fp32 tensor}}`` (tensors cloned)."""
        return {
            "decay": self.decay,
            "num_updates": self.num_updates,
            "shadow": {name: t.detach().clone() for name, t in self.shadow.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Exact inverse of ``state_dict`` (names and shapes must match the current shadow)."""
        shadow = state["shadow"]
        if shadow.keys() != self.shadow.keys():
            missing, extra = sorted(self.shadow.keys() - shadow.keys()), sorted(shadow.keys() - self.shadow.keys())
            raise KeyError(f"EMA state: parameter names differ (missing {missing[:5]}, unexpected {extra[:5]})")
        for name, t in shadow.items():
            if t.shape != self.shadow[name].shape:
                raise RuntimeError(
                    f"EMA state: {name!r} has shape {tuple(t.shape)}, expected {tuple(self.shadow[name].shape)}"
                )
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])
        self.shadow = {
            name: t.detach().to(self.shadow[name].device, torch.float32).clone() for name, t in shadow.items()
        }
