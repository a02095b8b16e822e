"""The float64 inverse-CDF draws of ``samplers.categorical`` against their exact laws (Pearson chi-square).

Every law here is known in closed form, so each test compares the empirical histogram of N draws with
it at the 1e-4 upper chi-square quantile; zero-weight states must never appear, and a wrong law
(a negative control) fails the same check by far.
"""

from __future__ import annotations

import pytest
import torch
from sampler_helpers import chi2, chi2_quantile

from udmtrain.diffusion.samplers import categorical as cat

N = 40000


def _counts(draws: torch.Tensor, V: int) -> torch.Tensor:
    return torch.bincount(draws.reshape(-1), minlength=V).to(torch.float64)


def _check(draws: torch.Tensor, law: torch.Tensor) -> float:
    """chi-square over the support of ``law``; asserts nothing outside it was drawn."""
    counts = _counts(draws, law.numel())
    support = law > 0
    assert counts[~support].sum() == 0, f"drew zero-weight states {torch.nonzero(counts * ~support).flatten()}"
    return chi2(counts[support], law[support] / law.sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sample_from_probs_matches_unnormalised_weights(dtype):
    w = torch.tensor([3.0, 0.0, 1.0, 0.5, 0.0, 2.5, 1e-3], dtype=torch.float64)  # zeros incl. inside
    g = torch.Generator().manual_seed(0)
    draws = cat.sample_from_probs(w.to(dtype).expand(N // 8, 8, 7), g)
    assert draws.shape == (N // 8, 8)
    assert _check(draws, w) < chi2_quantile(4)


def test_sample_from_probs_rows_are_independent_laws():
    # two rows with different supports, drawn together: each keeps its own law
    w = torch.tensor([[0.0, 0.0, 1.0, 3.0], [5.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
    draws = cat.sample_from_probs(w[None].expand(N, 2, 4), torch.Generator().manual_seed(1))
    assert _check(draws[:, 0], w[0]) < chi2_quantile(1)
    assert _check(draws[:, 1], w[1]) < chi2_quantile(1)


def test_sample_categorical_handles_log_weights_and_minus_inf():
    logp = torch.tensor([0.0, float("-inf"), -1.0, -40.0, 2.0], dtype=torch.float32) + 500.0  # shift-invariant
    draws = cat.sample_categorical(logp.expand(N, 1, 5), torch.Generator().manual_seed(2))
    law = torch.exp(logp.double() - 500.0)
    assert _check(draws, law) < chi2_quantile(3)


def test_tail_state_keeps_its_mass():
    # a state of weight 1e-3 / (1 + 1e-3): inverse CDF keeps its mass exactly (binomial count check)
    w = torch.tensor([1.0, 1e-3], dtype=torch.float64)
    draws = cat.sample_from_probs(w.expand(200000, 1, 2), torch.Generator().manual_seed(3))
    k, p = float((draws == 1).sum()), 1e-3 / 1.001
    assert abs(k - 200000 * p) < 5 * (200000 * p * (1 - p)) ** 0.5


def test_mixture_of_dense_atoms_and_uniform_is_the_sum_law():
    V, B = 6, N
    dense = torch.tensor([0.1, 0.0, 0.3, 0.2, 0.0, 0.4], dtype=torch.float32).expand(B, 1, V)
    a, b1, b2, c = 0.7, 0.2, 0.35, 0.05
    i1 = torch.full((B, 1), 1, dtype=torch.long)  # an atom on a zero-weight dense state
    i2 = torch.full((B, 1), 3, dtype=torch.long)
    draws = cat.sample_mixture(torch.Generator().manual_seed(4), dense_BLV=dense, dense_weight=a,
                               atoms=[(i1, torch.full((B, 1), b1, dtype=torch.float64)), (i2, b2)],
                               uniform_weight=c, num_states=V)
    law = a * dense[0, 0].double() + c
    law[1] += b1
    law[3] += b2
    assert _check(draws, law) < chi2_quantile(V - 1)
    # negative control: the same draws fail against the dense part alone
    assert chi2(_counts(draws, V), (law + 0.05) / (law + 0.05).sum()) > 10 * chi2_quantile(V - 1)


def test_mixture_per_position_weights_and_zero_mass_components():
    # per-position [B, L] atom weights; a component of mass 0 is never chosen
    B, V = N, 4
    z = torch.tensor([[0, 2]]).expand(B, 2)
    dense = torch.tensor([[0.0, 1.0, 1.0, 2.0], [3.0, 0.0, 1.0, 0.0]], dtype=torch.float64).expand(B, 2, V)
    keep = torch.tensor([[1.0, 0.0]], dtype=torch.float64).expand(B, 2)
    draws = cat.sample_mixture(torch.Generator().manual_seed(5), dense_BLV=dense, dense_weight=0.5,
                               atoms=[(z, keep)], uniform_weight=0.0, num_states=V)
    law0 = 0.5 * dense[0, 0].clone()
    law0[0] += 1.0
    assert _check(draws[:, 0], law0) < chi2_quantile(3)
    assert _check(draws[:, 1], dense[0, 1]) < chi2_quantile(1)


def test_atoms_and_uniform_only():
    B, V = N, 5
    x = torch.full((B, 1), 4, dtype=torch.long)
    draws = cat.sample_mixture(torch.Generator().manual_seed(6), atoms=[(x, 2.0)], uniform_weight=0.5, num_states=V)
    law = torch.full((V,), 0.5, dtype=torch.float64)
    law[4] += 2.0
    assert _check(draws, law) < chi2_quantile(V - 1)


def test_drop_state_last_is_a_view_other_is_zeroed():
    p = torch.rand(2, 3, 5)
    last = cat.drop_state(p, 4)
    assert last.shape == (2, 3, 4) and last.data_ptr() == p.data_ptr()
    mid = cat.drop_state(p, 1)
    assert torch.equal(mid[..., 1], torch.zeros(2, 3)) and torch.equal(mid[..., 0], p[..., 0]) and p[..., 1].min() > 0


def test_same_generator_seed_same_draws():
    w = torch.rand(4, 16, 50, dtype=torch.float64)
    one = cat.sample_from_probs(w, torch.Generator().manual_seed(7))
    two = cat.sample_from_probs(w, torch.Generator().manual_seed(7))
    assert torch.equal(one, two)


def _sparse_law(V: int) -> torch.Tensor:
    """Weights over V states: zeros everywhere but a scattered support that includes the first state, a
    whole zero block, zeros inside blocks and the last (shorter) block."""
    w = torch.zeros(V, dtype=torch.float64)
    support = [0, 5, 37, 38, 400, 401, 777, V // 2, V - 40, V - 2]
    for k, v in enumerate(support):
        w[v] = float(1 + (k * 7) % 5)
    return w


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_two_level_inverse_cdf_equals_one_level_for_exact_sums(dtype):
    V = 1500  # >= TWO_LEVEL_MIN_STATES; blocks of 39, the last one 18 states
    assert V >= cat.TWO_LEVEL_MIN_STATES and V % (cat.math.isqrt(V - 1) + 1)
    gen = torch.Generator().manual_seed(6)
    w = (torch.rand(3, 2, V, generator=gen) < 0.05).double() * torch.randint(1, 9, (3, 2, V), generator=gen)
    w[0, 0] = _sparse_law(V)  # small integer weights: every sum below is exact, also in float32
    cdf = cat.DenseCDF(w.to(dtype))
    assert cdf.block == 39 and torch.equal(cdf.total, w.sum(-1))
    full = torch.cumsum(w, -1)
    for frac in torch.linspace(0, 1, 301, dtype=torch.float64)[:-1]:
        target = frac * cdf.total
        got = cdf.find(target, torch.ones_like(target, dtype=torch.bool))
        assert torch.equal(got, cat._search(full, target)), frac  # the one-level search
    # targets on every block boundary (after trailing empty blocks that is the total itself: a rounded-up
    # target, which must give the last state of positive weight) and just below the total
    edges = torch.cat([cdf.cum[..., :-1], (cdf.total * (1 - 2**-52)).unsqueeze(-1)], dim=-1)
    for k in range(edges.shape[-1]):
        target = edges[..., k].contiguous()
        assert torch.equal(cdf.find(target, torch.ones_like(target, dtype=torch.bool)), cat._search(full, target))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_two_level_draws_follow_the_law(dtype):
    V = 2000
    law = _sparse_law(V) + 0.0
    law[1000:1003] = torch.tensor([1e-2, 0.0, 3e-2])  # small masses next to a zero
    dense = law.to(dtype).expand(N // 4, 4, V)
    draws = cat.sample_from_probs(dense, torch.Generator().manual_seed(7))
    assert _check(draws, law.to(dtype).double()) < chi2_quantile(int((law > 0).sum()) - 1)
    # the masked process drops its last state by a strided view: same law without it
    view = cat.drop_state(torch.cat([dense, torch.ones(N // 4, 4, 1, dtype=dtype)], dim=-1), V)
    assert not view.is_contiguous()
    assert _check(cat.sample_from_probs(view, torch.Generator().manual_seed(8)), law.to(dtype).double()) < \
        chi2_quantile(int((law > 0).sum()) - 1)


def test_two_level_negative_control():
    V = 2000
    law = _sparse_law(V)
    wrong = law.clone()
    wrong[V - 2] *= 1.5
    draws = cat.sample_from_probs(law.expand(N // 4, 4, V), torch.Generator().manual_seed(9))
    assert _check(draws, wrong) > chi2_quantile(int((law > 0).sum()) - 1)
