"""Every identity of docs/theory.md §2 / 1.2 / 3.1 checked against the brute-force oracle (float64)."""

import math

import pytest
import torch

from enum_oracle import (all_sequences, exact_denoiser, exact_loo, random_law, seq_index,
                         uniform_marginal)
from udmtrain.diffusion import functional as F

TOL = 1e-10
CASES = [(2, 3, 0, 0.6), (3, 2, 1, 0.05), (4, 3, 2, 0.37), (5, 2, 3, 0.93)]


def _setup(V, L, seed, a):
    law = random_law(V, L, seed, concentration=0.7)
    xt = all_sequences(V, L)
    alpha = torch.full((xt.shape[0], 1), a, dtype=torch.float64)
    return law, xt, alpha, exact_loo(law, V, L, xt, alpha), exact_denoiser(law, V, L, xt, alpha)


@pytest.mark.parametrize("V,L,seed,a", CASES)
def test_conversions_scores_and_inverses(V, L, seed, a):
    law, xt, alpha, lo, den = _setup(V, L, seed, a)
    assert torch.allclose(F.loo_to_denoiser(lo, xt, alpha), den, atol=TOL, rtol=0)
    assert torch.allclose(F.denoiser_to_loo(den, xt, alpha), lo, atol=TOL, rtol=0)
    # unnormalised logits: the conversions normalise (a constant shift must not matter)
    assert torch.allclose(F.loo_to_denoiser(lo + 3.0, xt, alpha), den, atol=TOL, rtol=0)
    s_true = torch.empty_like(lo)  # s(y) = q_t(z with z^l <- y) / q_t(z) by enumeration
    q = uniform_marginal(law, V, L, a)
    for l in range(L):
        for y in range(V):
            z = xt.clone()
            z[:, l] = y
            s_true[:, l, y] = q[seq_index(z, V)] / q[seq_index(xt, V)]
    s_lo, s_den = F.score_from_loo(lo, xt, alpha), F.score_from_denoiser(den, xt, alpha)
    assert torch.allclose(s_lo, s_true, atol=TOL, rtol=TOL)
    assert torch.allclose(s_den, s_true, atol=TOL, rtol=TOL)
    assert torch.equal(F.gather_tokens(s_lo, xt), torch.ones_like(xt, dtype=torch.float64))
    assert torch.allclose(F.loo_from_score(s_true, xt, alpha), lo, atol=1e-9, rtol=0)
    assert torch.allclose(F.denoiser_from_score(s_true, xt, alpha), den, atol=1e-9, rtol=0)


@pytest.mark.parametrize("V,L,seed,a", CASES)
def test_noisy_conditional_is_the_full_conditional_of_the_marginal(V, L, seed, a):
    law, xt, alpha, lo, _ = _setup(V, L, seed, a)
    q = uniform_marginal(law, V, L, a)
    cond = F.noisy_conditional(lo, alpha)
    for l in range(L):
        zs = [xt.clone() for _ in range(V)]
        for y in range(V):
            zs[y][:, l] = y
        joint = torch.stack([q[seq_index(z, V)] for z in zs], -1)
        assert torch.allclose(cond[:, l], torch.log(joint / joint.sum(-1, keepdim=True)), atol=TOL, rtol=0)


def _exact_bridge_by_bayes(V, x, z, at, as_):
    """q(z_s = y | z_t = z, x) = q_{t|s}(z | y) q_s(y | x) / q_t(z | x), per position, [B,L,V]."""
    y = torch.arange(V)
    a_ts = at / as_
    q_ts = a_ts[..., None] * (z[..., None] == y).double() + (1 - a_ts[..., None]) / V
    q_s = as_[..., None] * (x[..., None] == y).double() + (1 - as_[..., None]) / V
    q_t = at * (z == x).double() + (1 - at) / V
    return q_ts * q_s / q_t[..., None]


def test_uniform_bridge_exact_and_plugin_mixture():
    gen = torch.Generator().manual_seed(0)
    V, L = 5, 3
    law, xt, alpha_t, lo, den = _setup(V, L, 4, 0.3)
    B = xt.shape[0]
    alpha_s = torch.rand(B, 1, generator=gen, dtype=torch.float64) * 0.69 + 0.3  # s < t: alpha_s > alpha_t
    alpha_s[0] = 1.0  # s = 0 (the last sampling step) included
    x = torch.randint(0, V, (B, L), generator=gen)
    onehot = torch.nn.functional.one_hot(x, V).double()
    bridge = F.uniform_bridge(onehot, xt, alpha_t, alpha_s)
    assert torch.allclose(bridge, _exact_bridge_by_bayes(V, x, xt, alpha_t, alpha_s), atol=TOL, rtol=0)
    # plug-in bridge with the exact LOO == denoiser-mixture of exact bridges (docs/theory.md §2)
    mixture = sum(den[..., v:v + 1].exp() * F.uniform_bridge(
        torch.nn.functional.one_hot(torch.full_like(xt, v), V).double(), xt, alpha_t, alpha_s) for v in range(V))
    assert torch.allclose(F.uniform_bridge(lo.exp(), xt, alpha_t, alpha_s), mixture, atol=TOL, rtol=0)
    # ... and plugging the denoiser instead is measurably wrong (over-sticky)
    assert (F.uniform_bridge(den.exp(), xt, alpha_t, alpha_s) - mixture).abs().max() > 1e-3


def _udlm_spec_closed_form(lp, x0, xt, a, da):
    """docs/theory.md §3.1 verbatim: (alpha'/(V alpha)) (term1 - term2)."""
    V = lp.shape[-1]
    xbar_th = V * a[..., None] * lp.exp() + (1 - a[..., None])
    log_th = xbar_th.log()
    li, lx = F.gather_tokens(log_th, xt), F.gather_tokens(log_th, x0)
    same = x0 == xt
    xbar_i = 1 - a + V * a * same.double()
    term1 = V * (1 / xbar_i - 1 / li.exp())
    kappa = (1 - a) / (V * a + 1 - a)
    base = V * li - log_th.sum(-1)
    t2_same = kappa * base + (V - 1) * kappa * kappa.log()
    t2_diff = base - (V * a / (1 - a)) * (lx - li) - kappa.log() / kappa
    return da / (V * a) * (term1 - torch.where(same, t2_same, t2_diff))


def _udlm_path_kl(lp, x0, xt, a, da):
    """sum_{y != i} (lambda/V) [ŝ - s_x log ŝ + s_x (log s_x - 1)]."""
    V = lp.shape[-1]
    s_hat = F.score_from_loo(lp, xt, a)
    q = a[..., None] * torch.nn.functional.one_hot(x0, V).double() + (1 - a[..., None]) / V
    s_x = q / q.gather(-1, xt[..., None])
    term = s_hat - s_x * s_hat.log() + s_x * (s_x.log() - 1)
    not_i = 1 - torch.nn.functional.one_hot(xt, V).double()
    return (-da / a / V)[..., None].mul(term * not_i).sum(-1)


@pytest.mark.parametrize("V,a", [(2, 0.5), (5, 0.01), (5, 0.999), (7, 0.3)])
def test_udlm_nelbo_equals_spec_closed_form_and_path_kl(V, a):
    gen = torch.Generator().manual_seed(V)
    B, L = 64, 4
    lp = torch.log_softmax(3 * torch.randn(B, L, V, generator=gen, dtype=torch.float64), -1)
    x0 = torch.randint(0, V, (B, L), generator=gen)
    xt = torch.where(torch.rand(B, L, generator=gen) < 0.5, x0, torch.randint(0, V, (B, L), generator=gen))
    alpha = torch.full((B, 1), a, dtype=torch.float64)
    dalpha = torch.full((B, 1), -0.999, dtype=torch.float64)
    ours = F.udlm_nelbo(lp, x0, xt, alpha, dalpha)
    ref = _udlm_path_kl(lp, x0, xt, alpha, dalpha)
    assert torch.allclose(ours, ref, rtol=1e-9, atol=1e-9)
    assert torch.allclose(_udlm_spec_closed_form(lp, x0, xt, alpha, dalpha), ref, rtol=1e-6, atol=1e-6)
    assert (ours >= -1e-12).all()
    # float32 stays close to the float64 value even at alpha -> 1 (no O(V alpha/(1-alpha)) cancellation)
    ours32 = F.udlm_nelbo(lp.float(), x0, xt, alpha.float(), dalpha.float())
    assert ours32.dtype == torch.float32
    assert torch.allclose(ours32.double(), ref, rtol=1e-4, atol=1e-4)


def test_float_dtypes_bf16_upcast_and_gradients():
    V, B, L = 6, 2, 3
    logits = torch.randn(B, L, V, dtype=torch.bfloat16)
    xt = torch.randint(0, V, (B, L))
    alpha = torch.full((B, 1), 0.5)
    assert F.loo_to_denoiser(logits, xt, alpha).dtype == torch.float32
    assert F.loo_to_denoiser(logits.double(), xt, alpha.double()).dtype == torch.float64
    leaf = torch.randn(B, L, V, requires_grad=True)
    loss = F.udlm_nelbo(torch.log_softmax(leaf, -1), xt, xt.flip(1), alpha, -torch.ones(B, 1)).sum()
    loss.backward()
    assert torch.isfinite(leaf.grad).all() and leaf.grad.abs().sum() > 0


def test_schedule_functions():
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    for fn in (F.loglinear_alpha, F.cosine_alpha):
        a, da = fn(t, eps=1e-3)
        assert a[0] == 1.0 and math.isclose(a[-1].item(), 1e-3, rel_tol=1e-12)
        h = 1e-6
        fd = (fn(t[1:-1] + h, 1e-3)[0] - fn(t[1:-1] - h, 1e-3)[0]) / (2 * h)
        assert torch.allclose(fd, da[1:-1], atol=1e-8)
    a = torch.tensor([0.999, 0.5, 1e-3], dtype=torch.float64)
    assert torch.allclose(F.delta_t(a, 50000), torch.log(1 + 50000 * a / (1 - a)), rtol=1e-12)
    assert torch.allclose(F.log_c_t(a, 7).exp(), 7 * a / (1 - a), rtol=1e-12)
