"""Seeding: one recipe seed, deterministic derived seeds, no shared RNG state between ranks."""

from __future__ import annotations

import hashlib
import random

import torch

try:
    import numpy as np
except ImportError:  # pragma: no cover
    np = None


def derive_seed(seed: int, *keys: object) -> int:
    """A 63-bit seed from ``seed`` and ``keys`` (e.g. ``("data", rank)``) via BLAKE2b.

    Independent streams for different keys without drawing from any global generator, so every rank
    (and a resumed run) computes the same value.
    """
    text = repr((int(seed),) + tuple(keys)).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") & ((1 << 63) - 1)


def batch_seed(seed: int, batch: int) -> int:
    """The generator seed of sampling batch ``batch`` of a run seeded ``seed``: ``derive_seed(seed, "batch",
    batch)``. Runs with seeds 0 and 1 share no batch (``seed + batch`` made batch 1 of seed 0 batch 0 of
    seed 1, so "independent" seeds repeated most of their samples)."""
    return derive_seed(seed, "batch", int(batch))


def seed_everything(seed: int, rank: int = 0) -> int:
    """Seed python/numpy/torch (CPU and CUDA) with ``derive_seed(seed, "rank", rank)``; returns it.

    Use the same ``rank`` (0) on every rank before building the model so initial weights agree, and
    the true rank afterwards so dropout differs across data-parallel ranks.
    """
    value = derive_seed(seed, "rank", rank)
    random.seed(value)
    if np is not None:
        np.random.seed(value % (1 << 32))
    torch.manual_seed(value)
    return value
