"""Expected losses by exact enumeration over (x, z_t[, n]) (docs/theory.md §0): optimisers and NELBO = entropy.

Time integrals use tanh-sinh quadrature over alpha in (0, 1) (alpha = 1 - t, alpha' = -1, eps -> 0),
which handles the integrable endpoint singularities; 29 nodes reach ~1e-9 here.
"""

import numpy as np
import pytest
import torch

from enum_oracle import (all_sequences, entropy, exact_audm_posterior, exact_denoiser, exact_loo,
                         exact_masked_denoiser, random_law)
from udmtrain.diffusion import functional as F

V, L = 3, 3
D64 = torch.float64


def tanh_sinh(h=0.2, T=3.2):
    """Nodes/weights for int_0^1 f(a) da (double-exponential quadrature)."""
    tau = np.arange(-T, T + h / 2, h)
    s = np.pi / 2 * np.sinh(tau)
    a = 1 / (1 + np.exp(-2 * s))
    w = h * np.pi / 2 * np.cosh(tau) / np.cosh(s) ** 2 / 2
    keep = (a > 1e-13) & (a < 1 - 1e-13)
    return a[keep], w[keep]


@pytest.fixture(scope="module")
def law():
    return random_law(V, L, seed=3, concentration=1.0)


@pytest.fixture(scope="module")
def pairs():
    """All (x, z) pairs of the uniform process: X, Z [N*N, L], z-row index into all_sequences."""
    S = all_sequences(V, L)
    N = S.shape[0]
    return S, S.repeat_interleave(N, 0), S.repeat(N, 1), torch.arange(N).repeat(N)


def _uniform_weights(law, X, Z, a):
    N = all_sequences(V, L).shape[0]
    return law.repeat_interleave(N) * (a * (X == Z).to(D64) + (1 - a) / V).prod(-1)


def _col(a, n):
    return torch.full((n, 1), float(a), dtype=D64)


def _expect_uniform(law, pairs, a, fn):
    """E_{x, z ~ q_t}[sum_l fn(lo_BLV, den_BLV, X, Z, alpha, dalpha)] with the exact posteriors."""
    S, X, Z, zi = pairs
    lo, den = exact_loo(law, V, L, S, _col(a, len(S))), exact_denoiser(law, V, L, S, _col(a, len(S)))
    ell = fn(lo[zi], den[zi], X, Z, _col(a, len(X)), _col(-1.0, len(X)))
    return float((_uniform_weights(law, X, Z, a) * ell.sum(-1)).sum())


def test_plugin_nelbo_is_minimised_by_the_loo_and_cross_entropy_by_the_denoiser(law, pairs):
    a = 0.4
    S, X, Z, zi = pairs
    lo, den = exact_loo(law, V, L, S, _col(a, len(S))), exact_denoiser(law, V, L, S, _col(a, len(S)))
    w = _uniform_weights(law, X, Z, a)
    A, dA = _col(a, len(X)), _col(-1.0, len(X))

    def nelbo(xhat):
        return float((w * F.udlm_nelbo(xhat[zi], X, Z, A, dA).sum(-1)).sum())

    def ce(xhat):
        return float((w * F.denoising_cross_entropy(xhat[zi], X).sum(-1)).sum())

    gen = torch.Generator().manual_seed(0)
    assert nelbo(lo) < nelbo(den) - 1e-3
    assert ce(den) < ce(lo) - 1e-3
    for _ in range(5):
        bump = 0.05 * torch.randn(lo.shape, generator=gen, dtype=D64)
        assert nelbo(torch.log_softmax(lo + bump, -1)) > nelbo(lo)
        assert ce(torch.log_softmax(den + bump, -1)) > ce(den)


def test_integrated_uniform_nelbos_against_the_entropy(law, pairs):
    H = entropy(law)
    a_nodes, w_nodes = tanh_sinh()
    plug_lo = plug_den = mc = 0.0
    for a, w in zip(a_nodes, w_nodes):
        plug_lo += w * _expect_uniform(law, pairs, a, lambda lo, den, X, Z, A, dA: F.udlm_nelbo(lo, X, Z, A, dA))
        plug_den += w * _expect_uniform(law, pairs, a, lambda lo, den, X, Z, A, dA: F.udlm_nelbo(den, X, Z, A, dA))
        mc += w * _expect_uniform(law, pairs, a,
                                  lambda lo, den, X, Z, A, dA: F.max_coupling_nelbo(den, X, Z, A, dA))
    assert abs(plug_lo - H) < 1e-7, (plug_lo, H)  # the LOO plug-in reverse chain is exact
    assert plug_den > H + 0.1  # plugging the denoiser double-counts the own token
    assert mc > H + 0.1  # the observed max-coupling chain is not Markov: a strict gap remains


def test_integrated_mdlm_nelbo_equals_the_entropy(law):
    S = all_sequences(V, L)
    Zs = all_sequences(V + 1, L)
    X, Z = S.repeat_interleave(len(Zs), 0), Zs.repeat(len(S), 1)
    lawX = law.repeat_interleave(len(Zs))
    total = 0.0
    for a, w in zip(*tanh_sinh()):
        q = (a * (X == Z).to(D64) + (1 - a) * (Z == V).to(D64)).prod(-1)
        den = exact_masked_denoiser(law, V, L, Zs, _col(a, len(Zs))).repeat(len(S), 1, 1)
        keep = q > 0  # impossible (x, z) pairs have -inf log-probs and zero weight
        ell = F.mdlm_nelbo(den[keep], X[keep], Z[keep], _col(a, int(keep.sum())), _col(-1.0, int(keep.sum())), V)
        total += w * float((lawX[keep] * q[keep] * ell.sum(-1)).sum())
    assert abs(total - entropy(law)) < 1e-7


def _audm_rows(law):
    """All (x, n, mask pattern) rows: X, Nn, Z, weight factors (law(x)/V^L, #masked)."""
    S = all_sequences(V, L)
    M = all_sequences(2, L).bool()
    N = len(S)
    X = S.repeat_interleave(N * len(M), 0)
    Nn = S.repeat_interleave(len(M), 0).repeat(N, 1)
    Mm = M.repeat(N * N, 1)
    Z = torch.where(Mm, Nn, X)
    return X, Nn, Z, Mm, law.repeat_interleave(N * len(M)) / V**L


def test_audm_lift_preserves_the_uniform_joint_law(law):
    X, Nn, Z, Mm, base = _audm_rows(law)
    a = 0.35
    w = base * torch.where(Mm, 1 - a, a).prod(-1)
    S = all_sequences(V, L)
    N = len(S)
    idx = lambda s: (s * V ** torch.arange(L - 1, -1, -1)).sum(-1)  # noqa: E731
    joint_lift = torch.zeros(N * N, dtype=D64).index_add_(0, idx(X) * N + idx(Z), w)
    joint_udm = (law[:, None] * (a * (S[:, None] == S[None]).to(D64) + (1 - a) / V).prod(-1)).reshape(-1)
    assert torch.allclose(joint_lift, joint_udm, atol=1e-15)


def test_integrated_audm_nelbo_equals_the_entropy(law):
    X, Nn, Z, Mm, base = _audm_rows(law)
    total = 0.0
    for a, w in zip(*tanh_sinh()):
        weight = base * torch.where(Mm, 1 - a, a).prod(-1)
        post = exact_audm_posterior(law, V, L, Z, Nn, _col(a, len(Z)))
        ell = F.audm_nelbo(post, X, Z, Nn, _col(a, len(Z)), _col(-1.0, len(Z)))
        total += w * float((weight * ell.sum(-1)).sum())
    assert abs(total - entropy(law)) < 1e-7
