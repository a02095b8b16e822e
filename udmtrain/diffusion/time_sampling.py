"""Diffusion times, one per sequence, identical on every rank without shared RNG state (docs/theory.md §3, 10.10).

Each rank regenerates the *global* vector ``t_G`` (``G`` = micro batch x data-parallel ranks x
accumulation steps) from a fresh ``torch.Generator`` seeded by ``(seed, step)`` and keeps its own
slice ``[start, start + count)``; so ranks agree, and a resumed run draws the same times.
"""

from __future__ import annotations

import torch
from torch import Tensor

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """One round of the SplitMix64 mixer (decorrelates nearby (seed, step) pairs)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def step_generator(seed: int, step: int) -> torch.Generator:
    """A CPU generator seeded deterministically from ``(seed, step)``."""
    g = torch.Generator(device="cpu")
    g.manual_seed(_splitmix64(_splitmix64(int(seed) & _MASK64) ^ (int(step) & _MASK64)) >> 1)
    return g


def _slice(global_batch: int, start: int, count: int | None) -> tuple[int, int]:
    if global_batch < 1:
        raise ValueError(f"global_batch must be >= 1, got {global_batch}")
    count = global_batch - start if count is None else count
    if start < 0 or count < 0 or start + count > global_batch:
        raise ValueError(f"slice [{start}, {start + count}) is outside the global batch of {global_batch}")
    return start, count


def antithetic_times(global_batch: int, step: int, seed: int, eps: float = 1e-3, start: int = 0,
                     count: int | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Stratified ("antithetic") times ``t_B`` for this rank's slice ``[start, start + count)``.

    ``u_i ~ U[0, 1)``, ``t_i = (u_i / G + i / G) mod 1``, ``t <- (1 - eps) t + eps`` (so ``t in [eps, 1)``,
    one draw in each of the ``G`` strata).
    """
    start, count = _slice(global_batch, start, count)
    u = torch.rand(global_batch, generator=step_generator(seed, step), dtype=torch.float64)
    t = torch.remainder(u / global_batch + torch.arange(global_batch, dtype=torch.float64) / global_batch, 1.0)
    t = (1 - eps) * t + eps
    return t[start:start + count].to(dtype)


def iid_times(global_batch: int, step: int, seed: int, eps: float = 1e-3, start: int = 0,
              count: int | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """I.i.d. times ``t = (1 - eps) u + eps``, ``u ~ U[0, 1)``, for this rank's slice (same seeding)."""
    start, count = _slice(global_batch, start, count)
    u = torch.rand(global_batch, generator=step_generator(seed, step), dtype=torch.float64)
    return ((1 - eps) * u + eps)[start:start + count].to(dtype)


TIME_SAMPLERS = {"antithetic": antithetic_times, "iid": iid_times}
"""``train.time_sampling`` -> the function drawing this rank's slice of the global time vector."""


def sample_times(kind: str, global_batch: int, step: int, seed: int, eps: float = 1e-3, start: int = 0,
                 count: int | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Dispatch on ``train.time_sampling`` (``"antithetic"`` or ``"iid"``), with ``eps`` = ``train.t_min``."""
    try:
        fn = TIME_SAMPLERS[kind]
    except KeyError:
        raise ValueError(f"time_sampling must be one of {sorted(TIME_SAMPLERS)}, got {kind!r}") from None
    return fn(global_batch, step, seed, eps, start, count, dtype)
