"""Shared tiny-model helpers for the model tests (CPU, d=32, 2 blocks, V=64)."""

from __future__ import annotations

import pytest
import torch
from torch import nn


def perturb_zero_inits(model: nn.Module, std: float = 0.2, seed: int = 0) -> None:
    """Give every all-zero parameter (adaLN, heads, AUDM gates) random values, so that the paths the
    zero-init hides at initialisation become testable."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if torch.count_nonzero(p) == 0:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def perturb():
    """The ``perturb_zero_inits`` helper as a fixture (test modules do not import conftest)."""
    return perturb_zero_inits
