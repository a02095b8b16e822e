"""The Gibbs corrector (docs/theory.md §5.5) leaves the exact time-s law invariant: exact by enumeration of the
one-site kernel (uniform: over all V**L states; absorbing_uniform: over all (z, n) pairs), plus a
sampling check through the real sweep code (Gumbel-top-k site choice + Gumbel-argmax draw)."""

from __future__ import annotations

import itertools

import torch
from sampler_helpers import L, V, build, chi2, chi2_quantile, eo, law, network

from udmtrain.diffusion.samplers.base import SamplingRun
from udmtrain.diffusion.samplers.pc import nfe_split, selection_score

S = 0.5  # corrector time


def _run(net, z_BL, noise_BL=None, seed=0):
    return SamplingRun(network=net, generator=torch.Generator().manual_seed(seed), z_BL=z_BL,
                       noise_BL=noise_BL, prefix_BL=None, prefix_len=0)


def _alpha(smp, z):
    return float(smp.alpha_B1(S, _run(None, z))[0, 0])


def _uniform_kernel(cond_ZLV, Z_NL, site_prob_ZL=None):
    """K[z, z'] of single-site Gibbs from per-site conditionals; sites uniform unless given."""
    N = Z_NL.shape[0]
    K = torch.zeros(N, N, dtype=torch.float64)
    for a in range(N):
        for l in range(L):
            w = 1.0 / L if site_prob_ZL is None else site_prob_ZL[a, l]
            for v in range(V):
                y = Z_NL[a].clone()
                y[l] = v
                K[a, int(eo.seq_index(y[None], V))] += w * cond_ZLV[a, l, v].exp()
    return K


def test_uniform_gibbs_kernel_leaves_time_s_marginal_invariant_exactly():
    data = law(5)
    smp = build("pc_gibbs", "uniform", "loo", k_parallel=1, selection="random")
    Z = eo.all_sequences(V, L)
    cond, eligible = smp.conditional(_run(network("uniform", data, "loo"), Z.clone()), S)
    assert bool(eligible.all())
    K = _uniform_kernel(cond.double(), Z)
    pi = eo.uniform_marginal(data, V, L, _alpha(smp, Z))
    assert torch.allclose(K.sum(1), torch.ones(len(Z), dtype=torch.float64), atol=1e-12)
    assert torch.allclose(pi @ K, pi, atol=1e-12)
    # controls, so the check can fail: drawing the site from the LOO itself (no noise mixing) ...
    loo = eo.exact_loo(data, V, L, Z, _alpha(smp, Z))
    assert (pi @ _uniform_kernel(loo, Z) - pi).abs().max() > 1e-3
    # ... and informed site selection (docs/theory.md §5.5 'lowest_log_margin'): the site choice depends on the
    # state, so the blocked sampler is only approximately invariant, as documented
    informed = build("pc_gibbs", "uniform", "loo", k_parallel=1, selection="lowest_log_margin")
    score = selection_score(cond, Z, "lowest_log_margin", None)
    K_inf = _uniform_kernel(cond.double(), Z, torch.softmax(score / informed.cfg.selection_tau, -1))
    assert (pi @ K_inf - pi).abs().max() > 1e-4


def test_uniform_denoiser_network_gives_the_same_exact_conditional():
    data = law(5)
    Z = eo.all_sequences(V, L)
    c_loo = build("pc_gibbs", "uniform", "loo").conditional(_run(network("uniform", data, "loo"), Z.clone()), S)[0]
    c_den = build("pc_gibbs", "uniform", "denoiser").conditional(
        _run(network("uniform", data, "denoiser"), Z.clone()), S)[0]
    assert torch.allclose(c_loo, c_den, atol=1e-10)  # docs/theory.md §10.2: convert from what the net returns


def test_audm_restricted_gibbs_kernel_leaves_the_lifted_law_invariant_exactly():
    data = law(6)
    smp = build("pc_gibbs", "absorbing_uniform", k_parallel=1, selection="random")
    pairs = list(itertools.product(range(V), repeat=2))          # (z^l, n^l)
    states = list(itertools.product(range(len(pairs)), repeat=L))
    z = torch.tensor([[pairs[i][0] for i in s] for s in states])
    n = torch.tensor([[pairs[i][1] for i in s] for s in states])
    a = _alpha(smp, z)
    # exact law pi(z, n) = sum_x law(x) prod_l [(1-a) 1[z=n] + a 1[z=x]] / V
    X = eo.all_sequences(V, L)
    f = ((1 - a) * (z == n)[:, None, :].double() + a * (z[:, None, :] == X[None]).double()) / V
    pi = f.prod(-1) @ data
    assert abs(float(pi.sum()) - 1.0) < 1e-12
    cond, eligible = smp.conditional(_run(network("absorbing_uniform", data), z.clone(), n.clone()), S)
    index = {s: i for i, s in enumerate(states)}
    K = torch.zeros(len(states), len(states), dtype=torch.float64)
    for i, s in enumerate(states):
        sites = [l for l in range(L) if bool(eligible[i, l])]
        if not sites:
            K[i, i] = 1.0
        for l in sites:
            for v in range(V):
                t = list(s)
                t[l] = pairs.index((v, v))
                K[i, index[tuple(t)]] += cond[i, l, v].double().exp() / len(sites)
    assert torch.equal(eligible, z == n)
    assert torch.allclose(K.sum(1), torch.ones(len(states), dtype=torch.float64), atol=1e-12)
    assert torch.allclose(pi @ K, pi, atol=1e-12)


def test_corrector_sweeps_preserve_the_marginal_by_sampling():
    data = law(7)
    smp = build("pc_gibbs", "uniform", "loo", k_parallel=1, selection="random")
    Z = eo.all_sequences(V, L)
    pi = eo.uniform_marginal(data, V, L, _alpha(smp, Z))
    g = torch.Generator().manual_seed(11)
    z0 = Z[torch.multinomial(pi, 4000, replacement=True, generator=g)]
    run = _run(network("uniform", data, "loo"), z0.clone(), seed=12)
    for _ in range(6):
        smp.corrector_sweep(run, S)
    assert (run.z_BL != z0).any(dim=1).float().mean() > 0.3  # it did move
    counts = torch.bincount(eo.seq_index(run.z_BL, V), minlength=V**L).double()
    assert chi2(counts, pi) < chi2_quantile(V**L - 1)


def test_nfe_split_uses_the_whole_budget():
    for nfe in (1, 2, 3, 7, 16, 33, 256):
        for c in (0, 1, 2, 3):
            n_steps, corrected = nfe_split(nfe, c)
            assert n_steps + corrected * c == nfe and 0 <= corrected < n_steps
    assert nfe_split(256, 2) == (86, 85)  # docs/theory.md §5.5 example


def test_selection_scores_equal_their_float64_formulas():
    """The rules pick entries of the float32 conditional (top two, max) instead of copying it to float64:
    the scores must equal the formulas on a float64 copy, ties at the current token included."""
    gen = torch.Generator().manual_seed(3)
    cond = torch.log_softmax(torch.randn(4, 6, 9, generator=gen), -1)
    z = torch.randint(0, 9, (4, 6), generator=gen)
    cond[0, 0, z[0, 0]] = cond[0, 0].max()  # a tie between the current token and another state
    cond[0, 0, (z[0, 0] + 1) % 9] = cond[0, 0].max()
    c64 = cond.double()
    current = c64.gather(-1, z[..., None]).squeeze(-1)
    others = c64.scatter(-1, z[..., None], float("-inf")).amax(-1)
    want = {"lowest_log_margin": -(current - others), "lowest_current_prob": -current,
            "lowest_maxprob": -c64.amax(-1)}
    for rule, expected in want.items():
        got = selection_score(cond, z, rule)
        assert got.dtype == torch.float64 and torch.equal(got, expected), rule
