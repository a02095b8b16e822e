"""eval/ppl.py: the NELBO estimator's statistics against closed forms."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import torch

from udmtrain.eval.ppl import estimate_nelbo, exact_ar_nll, gauss_legendre_times, stratified_times

EPS = 1e-3


def f_cos(t):
    """A smooth non-polynomial integrand (per token)."""
    return torch.cos(5 * t) + 2 + t**2


def f_cos_mean(eps=EPS):
    """1/(1-eps) * int_eps^1 f_cos(t) dt in closed form."""
    F = lambda t: math.sin(5 * t) / 5 + 2 * t + t**3 / 3  # noqa: E731
    return (F(1.0) - F(eps)) / (1 - eps)


def make_nelbo_fn(f, noise_scale=0.0, pad_value=float("nan")):
    """Per-token NELBO = f(t) * (1 + position/10) (+ N(0, s^2) drawn from the given generator);
    padded positions return NaN so any leak of padding into the sums is caught."""
    calls = []

    def nelbo_fn(x0_BL, valid_BL, t_B, generator):
        calls.append(t_B.clone())
        B, L = x0_BL.shape
        pos_L = 1 + torch.arange(L, dtype=torch.float64) / 10
        out = f(t_B.double())[:, None] * pos_L[None, :]
        if noise_scale:
            out = out + noise_scale * torch.randn(B, L, generator=generator, dtype=torch.float64)
        return torch.where(valid_BL, out, torch.full_like(out, pad_value))

    nelbo_fn.calls = calls
    return nelbo_fn


def full_batches(num_batches, B, L):
    return [{"input_ids": torch.zeros(B, L, dtype=torch.long), "valid": torch.ones(B, L, dtype=torch.bool)}
            for _ in range(num_batches)]


def test_stratified_times_one_per_stratum():
    u_B = torch.tensor([0.1, 0.3, 0.9], dtype=torch.float64)
    t_BK = stratified_times(u_B, 4, EPS)
    s_BK = (t_BK - EPS) / (1 - EPS) * 4  # stratum coordinate: k + u
    expected_BK = torch.arange(4.0, dtype=torch.float64)[None, :] + u_B[:, None]
    assert torch.allclose(s_BK, expected_BK, atol=1e-12)
    assert float(t_BK.min()) >= EPS and float(t_BK.max()) <= 1.0


def test_quadrature_exact_for_polynomials_and_smooth_integrands():
    # K = 2 is exact for degree 3 (2K - 1).
    poly = lambda t: 1 + 2 * t - 3 * t**2 + 4 * t**3  # noqa: E731
    exact = (lambda a, b: (b + b**2 - b**3 + b**4) - (a + a**2 - a**3 + a**4))(EPS, 1.0) / (1 - EPS)
    t_K, w_K = gauss_legendre_times(2, EPS)
    assert abs(float((w_K * poly(t_K)).sum()) - exact) < 1e-12
    batches = full_batches(2, 3, 4)
    pos_mean = float((1 + torch.arange(4, dtype=torch.float64) / 10).mean())
    out = estimate_nelbo(make_nelbo_fn(poly), batches, num_t_samples=2, method="quadrature", eps=EPS, rank=0)
    assert abs(out["nll"] - exact * pos_mean) < 1e-8
    out = estimate_nelbo(make_nelbo_fn(f_cos), batches, num_t_samples=16, method="quadrature", eps=EPS, rank=0)
    assert abs(out["nll"] - f_cos_mean() * pos_mean) < 1e-8
    assert out["ppl"] == pytest.approx(math.exp(out["nll"]), rel=1e-12)
    assert out["bpd"] == pytest.approx(out["nll"] / math.log(2), rel=1e-12)
    assert out["nll_stderr"] < 1e-12  # identical deterministic sequences: no spread at all


def test_mc_unbiased_and_stderr_matches_seed_spread():
    truth = f_cos_mean()
    B, L = 16, 1
    estimates, stderrs = [], []
    for seed in range(300):
        out = estimate_nelbo(make_nelbo_fn(f_cos), full_batches(1, B, L), num_t_samples=2, seed=seed, rank=0)
        estimates.append(out["nll"])
        stderrs.append(out["nll_stderr"])
    estimates = np.array(estimates)
    # unbiased: the mean over 300 seeds is within 4 standard errors of that mean
    se_of_mean = estimates.std(ddof=1) / math.sqrt(len(estimates))
    assert abs(estimates.mean() - truth) < 4 * se_of_mean
    # the delta-method stderr (per run) matches the spread across seeds (all sequences identical,
    # so the only variation is the t draw)
    ratio = np.mean(stderrs) / estimates.std(ddof=1)
    assert 0.85 < ratio < 1.15, ratio
    # stratification reduces variance relative to K independent draws: K=2 spread < K=1 spread / sqrt(2)
    one = [estimate_nelbo(make_nelbo_fn(f_cos), full_batches(1, B, L), num_t_samples=1, seed=s, rank=0)["nll"]
           for s in range(300)]
    assert estimates.std() < np.std(one) / math.sqrt(2)


def test_token_counting_with_padding_and_per_sequence_sums():
    valid = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    batches = [{"input_ids": torch.zeros(3, 4, dtype=torch.long), "valid": valid},
               torch.zeros(1, 4, dtype=torch.long)]  # a bare tensor: all valid
    const = lambda t: torch.ones_like(t)  # noqa: E731
    out = estimate_nelbo(make_nelbo_fn(const), batches, num_t_samples=3, method="mc", rank=0)
    pos = [1.0, 1.1, 1.2, 1.3]
    per_seq = [sum(pos[:3]), pos[0], sum(pos)]  # fully padded row skipped
    tokens = [3, 1, 4]
    assert out["num_tokens"] == 8 and out["num_sequences"] == 3
    R = sum(per_seq) / sum(tokens)
    assert out["nll"] == pytest.approx(R, abs=1e-12)
    d = np.array(per_seq) - R * np.array(tokens)
    expected_se = math.sqrt((d**2).sum() / 2 / 3) / (8 / 3)
    assert out["nll_stderr"] == pytest.approx(expected_se, rel=1e-10)
    assert out["num_forward_calls"] == 2 * 3
    for key in ("method", "num_t_samples", "eps", "seed", "stderr_method", "token_accounting"):
        assert key in out


def test_protocol_merged_seed_reproducible_and_errors():
    fn = make_nelbo_fn(f_cos, noise_scale=0.5)
    a = estimate_nelbo(fn, full_batches(2, 4, 3), num_t_samples=2, seed=7, rank=0, protocol={"ema": True})
    b = estimate_nelbo(fn, full_batches(2, 4, 3), num_t_samples=2, seed=7, rank=0)
    c = estimate_nelbo(fn, full_batches(2, 4, 3), num_t_samples=2, seed=7, rank=1)
    assert a["ema"] is True and a["nll"] == b["nll"] and a["nll"] != c["nll"]
    with pytest.raises(ValueError, match="method must be one of"):
        estimate_nelbo(fn, [], method="trapezoid")
    with pytest.raises(ValueError, match="no valid token"):
        estimate_nelbo(fn, [], rank=0)
    bad = lambda x, v, t, g: torch.full(x.shape, float("inf"))  # noqa: E731
    with pytest.raises(FloatingPointError, match="batch 0 at sequence 0, position 0"):
        estimate_nelbo(bad, full_batches(1, 2, 2), rank=0)
    with pytest.raises(KeyError, match="input_ids"):
        estimate_nelbo(fn, [{"tokens": torch.zeros(1, 2)}], rank=0)


def test_distributed_sum_over_two_ranks_equals_single_process():
    """Two 'ranks' as threads with a barrier-based all_reduce_sum: exact agreement with one process."""
    batches = full_batches(4, 3, 5)
    for i, b in enumerate(batches):
        b["valid"][:, 5 - i:] = False  # different padding per batch
        b["input_ids"] = torch.arange(15).reshape(3, 5) + i

    def per_seq_fn(x0_BL, valid_BL, t_B, generator):  # depends on the data, not on the rank
        return (x0_BL.double() + 1) * f_cos(t_B.double())[:, None]

    single = estimate_nelbo(per_seq_fn, batches, num_t_samples=3, method="quadrature", rank=0)
    barrier, slots, results = threading.Barrier(2), [None, None], [None, None]

    def run(rank):
        def all_reduce_sum(tensor):
            slots[rank] = tensor.clone()
            barrier.wait()
            total = slots[0] + slots[1]
            barrier.wait()
            return total

        results[rank] = estimate_nelbo(per_seq_fn, batches[rank::2], num_t_samples=3, method="quadrature",
                                       rank=rank, all_reduce_sum=all_reduce_sum)

    threads = [threading.Thread(target=run, args=(r,)) for r in (0, 1)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    for r in results:
        assert r["num_ranks"] == 2
        assert r["num_tokens"] == single["num_tokens"] and r["num_sequences"] == single["num_sequences"]
        assert r["nll"] == pytest.approx(single["nll"], rel=1e-13)
        assert r["nll_stderr"] == pytest.approx(single["nll_stderr"], rel=1e-9)


def test_exact_ar_nll_with_scored_mask():
    x = torch.tensor([[5, 6, 7], [8, 9, 0]])
    valid = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)

    def nll_fn(x_BL, valid_BL):
        scored = torch.ones_like(valid_BL)
        scored[:, 0] = False  # the first token is not predicted
        return x_BL.double() / 10, scored

    out = exact_ar_nll(nll_fn, [{"input_ids": x, "valid": valid}], protocol={"checkpoint": "c"})
    assert out["num_tokens"] == 3 and out["num_sequences"] == 2
    assert out["nll"] == pytest.approx((0.6 + 0.7 + 0.9) / 3, abs=1e-12)
    assert out["estimator"] == "exact_ar" and out["checkpoint"] == "c"


def test_torch_all_reduce_sum_on_a_one_rank_gloo_group(tmp_path):
    import torch.distributed as dist

    from udmtrain.eval.ppl import torch_all_reduce_sum

    # Another in-process test (the engine fixtures) may already hold a one-rank group: reuse it.
    own_group = not dist.is_initialized()
    if own_group:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert dist.get_world_size() == 1
        out = estimate_nelbo(make_nelbo_fn(f_cos), full_batches(1, 2, 2), num_t_samples=2, method="quadrature",
                             all_reduce_sum=torch_all_reduce_sum)
        assert out["num_ranks"] == 1 and out["num_tokens"] == 4
    finally:
        if own_group:
            dist.destroy_process_group()
