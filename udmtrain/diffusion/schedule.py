"""Noise schedules: ``t in [0, 1] -> alpha_t`` = probability that a token is still clean (docs/theory.md §1).

Shape legend: ``t_B`` float ``[B]``; ``alpha_B``, ``dalpha_B``, ``sigma_B`` float ``[B]``.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from udmtrain.diffusion import functional as F
from udmtrain.registry import SCHEDULE


class Schedule(abc.ABC):
    """``alpha(t)`` with ``alpha(0) = 1`` and ``alpha(1) = eps``; ``sigma = -log alpha`` feeds the network."""

    requires: ClassVar[Mapping[str, frozenset[str]]] = {}

    @abc.abstractmethod
    def alpha(self, t_B: Tensor) -> tuple[Tensor, Tensor]:
        """``(alpha_B, dalpha_B)`` with ``dalpha = d alpha / dt`` (float32 or float64, as ``t_B``)."""

    def sigma(self, t_B: Tensor) -> Tensor:
        """Network time input ``sigma_B = -log alpha_B``."""
        return F.sigma_from_alpha(self.alpha(t_B)[0])


def _check_eps(eps: float, name: str) -> None:
    if not 0.0 < eps < 1.0:
        raise ValueError(f"schedule {name}: eps must lie in (0, 1) (alpha(1) = eps), got {eps}")


@SCHEDULE.register("loglinear")
class LogLinearSchedule(Schedule):
    """``alpha_t = 1 - (1 - eps) t`` (MDLM's "log-linear": ``sigma_t = -log(1 - (1 - eps) t)``)."""

    @dataclass(kw_only=True, frozen=True)
    class Config:
        eps: float = 1e-3
        """alpha(1) = eps: the prior is reached up to this residue (docs/theory.md §1, 10.11)."""

        def __post_init__(self) -> None:
            _check_eps(self.eps, "loglinear")

    def __init__(self, cfg: Config | None = None) -> None:
        self.cfg = cfg if cfg is not None else self.Config()

    def alpha(self, t_B: Tensor) -> tuple[Tensor, Tensor]:
        return F.loglinear_alpha(torch.as_tensor(t_B), self.cfg.eps)


@SCHEDULE.register("cosine")
class CosineSchedule(Schedule):
    """``alpha_t = eps + (1 - eps) cos(pi t / 2)``."""

    @dataclass(kw_only=True, frozen=True)
    class Config:
        eps: float = 1e-3
        """alpha(1) = eps."""

        def __post_init__(self) -> None:
            _check_eps(self.eps, "cosine")

    def __init__(self, cfg: Config | None = None) -> None:
        self.cfg = cfg if cfg is not None else self.Config()

    def alpha(self, t_B: Tensor) -> tuple[Tensor, Tensor]:
        return F.cosine_alpha(torch.as_tensor(t_B), self.cfg.eps)
