"""Sampling batch seeds: reproducible from the recorded seed, and disjoint between run seeds."""

from __future__ import annotations

from udmtrain.utils.seed import batch_seed


def test_batch_seeds_of_neighbouring_run_seeds_share_nothing():
    """With ``seed + i``, batch 1 of --seed 0 was batch 0 of --seed 1: "independent" runs repeated samples."""
    runs = {seed: [batch_seed(seed, i) for i in range(64)] for seed in (-1, 0, 1, 2)}
    flat = [s for seeds in runs.values() for s in seeds]
    assert len(set(flat)) == len(flat)
    assert batch_seed(0, 3) == 3922342476504907084  # pinned: recorded seeds must keep reproducing their samples
    assert all(0 <= s < 2**63 for s in flat)
