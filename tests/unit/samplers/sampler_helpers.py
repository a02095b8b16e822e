"""Shared helpers for the sampler tests: build components, exact laws, chi-square checks."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/ (for enum_oracle)

import enum_oracle as eo  # noqa: E402

from udmtrain.registry import PARAMETERIZATION, PROCESS, SAMPLER, SCHEDULE  # noqa: E402

torch.set_num_threads(1)  # tiny tensors: threads only add contention on shared CPUs

V, L = 3, 3
ORACLE_KIND = {"masked": "masked", "absorbing_uniform": "audm"}


def law(seed: int = 0) -> torch.Tensor:
    """A random law over all V**L sequences with every mass >= 0.5 / V**L (chi-square cells stay
    well populated) and strong correlations (half of it is a Dirichlet(1) draw)."""
    return 0.5 * eo.random_law(V, L, seed) + 0.5 / V**L


def components(process: str, param: str = "denoiser"):
    """(schedule, process, parameterization) with the default log-linear schedule."""
    proc = PROCESS.build(process, None, vocab_size=V)
    return SCHEDULE.build("loglinear"), proc, PARAMETERIZATION.build(param, None, process=proc)


def build(sampler: str, process: str, param: str = "denoiser", **cfg):
    """A sampler of ``sampler`` for ``process`` with Config fields ``cfg``."""
    cls = SAMPLER.get(sampler)
    schedule, proc, par = components(process, param)
    return cls(cls.Config(**cfg), schedule=schedule, process=proc, parameterization=par)


def network(process: str, data_law, kind: str | None = None) -> eo.ExactNetwork:
    """Exact oracle network; uniform default: the exact denoiser."""
    return eo.ExactNetwork(data_law, V, L, kind or ORACLE_KIND.get(process, "denoiser"))


def histogram(tokens_BL: torch.Tensor) -> torch.Tensor:
    """Counts of every sequence, ``[V**L]`` float64."""
    assert int(tokens_BL.max()) < V and int(tokens_BL.min()) >= 0
    return torch.bincount(eo.seq_index(tokens_BL.cpu(), V), minlength=V**L).to(torch.float64)


def chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson statistic ``sum (O - E)^2 / E``."""
    expected = counts.sum() * probs
    return float(((counts - expected) ** 2 / expected).sum())


def chi2_quantile(df: int, z: float = 3.719) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile at normal score ``z``
    (3.719 <-> upper tail 1e-4): a correct sampler fails with probability ~1e-4 at a fixed seed."""
    h = 2.0 / (9.0 * df)
    return df * (1.0 - h + z * math.sqrt(h)) ** 3
