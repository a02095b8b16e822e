"""eval/ppl.py end to end on the exact oracle: ``estimate_nelbo`` equals the NELBO computed by enumeration.

The pipeline under test is the one evaluation runs: registry-built process / loglinear schedule /
parameterization / NELBO loss -> ``DiffusionObjective`` -> ``train.build.nelbo_fn`` adapter ->
``estimate_nelbo(method="quadrature")``, with the network replaced by the exact posterior of a random
law over V^L sequences (``tests/enum_oracle.py``). The reference bypasses all of it: for every clean
sequence x and position l, the expected integrand

    e_l(x, t) = sum_z q_t(z | x) ell_l(x, z, t)          (AUDM: sum over (n, mask pattern) instead of z)

is enumerated in float64 with the oracle posterior fed straight into ``udmtrain.diffusion.functional``
(alpha = 1 - (1 - eps) t, dalpha = -(1 - eps) written out here), then

    NELBO_l(x) = 1/(1-eps) int_eps^1 e_l(x, t) dt

by tanh-sinh quadrature (converged to ~1e-7; the integrand has singularities at t = 0 and
t = 1/(1-eps), each 1e-3 outside [eps, 1]) and also by the same K-point Gauss-Legendre rule
``estimate_nelbo`` uses, so the time-quadrature error and the Monte-Carlo error (over z and n only;
the times are deterministic) are checked separately.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from enum_oracle import (ExactNetwork, all_sequences, entropy, exact_audm_posterior, exact_loo,
                         exact_masked_denoiser, random_law, seq_index)
from udmtrain.diffusion import functional as F
from udmtrain.diffusion.objective import DiffusionObjective
from udmtrain.eval.ppl import estimate_nelbo
from udmtrain.registry import LOSS, PARAMETERIZATION, PROCESS, SCHEDULE
from udmtrain.train.build import Components, nelbo_fn

V, L, EPS = 3, 3, 1e-3
K = 32  # Gauss-Legendre nodes: time-quadrature error <= ~1.2e-4 nats per sequence here (measured below)
R = 800  # Monte-Carlo replicas of each support sequence
D64 = torch.float64
S_NL = all_sequences(V, L)
N = S_NL.shape[0]

# case -> (process, parameterization, loss, oracle kind)
CASES = {
    "udlm_loo_plugin": ("uniform", "loo", "plugin_nelbo", "loo"),
    "mdlm": ("masked", "denoiser", "mdlm_nelbo", "masked"),
    "audm": ("absorbing_uniform", "denoiser", "audm_nelbo", "audm"),
}


def _col(value, n: int) -> torch.Tensor:
    return torch.full((n, 1), float(value), dtype=D64)


def expected_integrand(kind: str, law: torch.Tensor, t: float) -> torch.Tensor:
    """``e_l(x, t) = E_{z ~ q_t(.|x)}[ell_l(x, z, t)]`` for every support sequence x -> float64 ``[N, L]``."""
    a, da = 1.0 - (1.0 - EPS) * t, -(1.0 - EPS)
    if kind == "loo":  # uniform process, plug-in NELBO on the exact LOO
        X, Z, zi = S_NL.repeat_interleave(N, 0), S_NL.repeat(N, 1), torch.arange(N).repeat(N)
        q = (a * (X == Z).to(D64) + (1 - a) / V).prod(-1)
        lo = exact_loo(law, V, L, S_NL, _col(a, N))[zi]
        ell = F.udlm_nelbo(lo, X, Z, _col(a, len(X)), _col(da, len(X)))
        return (q[:, None] * ell).reshape(N, N, L).sum(1)
    if kind == "masked":  # z over (V+1)^L; impossible (x, z) pairs (weight 0, -inf log-probs) skipped
        Zs = all_sequences(V + 1, L)
        M = len(Zs)
        X, Z, zi = S_NL.repeat_interleave(M, 0), Zs.repeat(N, 1), torch.arange(M).repeat(N)
        q = (a * (X == Z).to(D64) + (1 - a) * (Z == V).to(D64)).prod(-1)
        keep = q > 0
        den = exact_masked_denoiser(law, V, L, Zs, _col(a, M))[zi[keep]]
        k = int(keep.sum())
        ell = torch.zeros(len(X), L, dtype=D64)
        ell[keep] = F.mdlm_nelbo(den, X[keep], Z[keep], _col(a, k), _col(da, k), V)
        return (q[:, None] * ell).reshape(N, M, L).sum(1)
    # AUDM: rows (x, n, mask pattern m), z = n where m else x, weight V^-L prod(m ? 1-a : a).
    # The posterior depends on (z, n) only: computed once for all N*N pairs, then gathered.
    Mk = all_sequences(2, L).bool()
    P = N * len(Mk)
    X = S_NL.repeat_interleave(P, 0)
    Nn = S_NL.repeat_interleave(len(Mk), 0).repeat(N, 1)
    Mm = Mk.repeat(N * N, 1)
    Z = torch.where(Mm, Nn, X)
    w = torch.where(Mm, 1 - a, a).prod(-1) / V**L
    Zp, Np = S_NL.repeat_interleave(N, 0), S_NL.repeat(N, 1)  # pair index = idx(z) * N + idx(n)
    post_pairs = exact_audm_posterior(law, V, L, Zp, Np, _col(a, N * N))
    post = post_pairs[seq_index(Z, V) * N + seq_index(Nn, V)]
    ell = F.audm_nelbo(post, X, Z, Nn, _col(a, len(X)), _col(da, len(X)))
    return (w[:, None] * ell).reshape(N, P, L).sum(1)


def tanh_sinh_times(h: float, T: float = 3.5) -> tuple[np.ndarray, np.ndarray]:
    """Nodes t in (eps, 1) and weights w with ``sum w f(t) ~= 1/(1-eps) int_eps^1 f(t) dt`` (double exponential)."""
    tau = np.arange(-T, T + h / 2, h)
    s = np.pi / 2 * np.sinh(tau)
    u = 1 / (1 + np.exp(-2 * s))
    w = h * np.pi / 2 * np.cosh(tau) / np.cosh(s) ** 2 / 2
    return EPS + (1 - EPS) * u, w


def gauss_legendre(num: int) -> tuple[np.ndarray, np.ndarray]:
    """K-point Gauss-Legendre for ``1/(1-eps) int_eps^1`` (written here, not taken from eval.ppl)."""
    x, w = np.polynomial.legendre.leggauss(num)
    return EPS + (1 - EPS) * (x + 1) / 2, w / 2


def time_integral(kind: str, law: torch.Tensor, rule) -> torch.Tensor:
    """``sum_k w_k e(x, t_k)`` -> float64 ``[N, L]``."""
    t_K, w_K = rule
    return sum(float(w) * expected_integrand(kind, law, float(t)) for t, w in zip(t_K, w_K))


@pytest.fixture(scope="module")
def law():
    return random_law(V, L, seed=11, concentration=1.0)


@pytest.fixture(scope="module")
def reference(law):
    """case -> (exact NELBO_l(x) [N, L] by tanh-sinh, the same with estimate_nelbo's K-node rule)."""
    out = {}
    for case, (*_, kind) in CASES.items():
        out[case] = (time_integral(kind, law, tanh_sinh_times(0.1)), time_integral(kind, law, gauss_legendre(K)))
    return out


def build_eval_fn(case: str, law: torch.Tensor):
    """The evaluation's ``nelbo_fn`` for ``case`` with the exact oracle as the network."""
    process_name, param_name, loss_name, kind = CASES[case]
    process = PROCESS.build(process_name, vocab_size=V)
    schedule = SCHEDULE.build("loglinear", SCHEDULE.get("loglinear").Config(eps=EPS))
    param = PARAMETERIZATION.build(param_name, process=process)
    loss = LOSS.build(loss_name, process=process)
    components = Components(model=torch.nn.Identity(), objective=DiffusionObjective(schedule, process, param, loss),
                            process=process, schedule=schedule, parameterization=param, loss=loss)
    oracle = ExactNetwork(law, V, L, kind)
    assert oracle.num_states == process.num_states
    return nelbo_fn(components, oracle), oracle


def test_reference_quadratures_agree_and_match_the_entropy(law, reference):
    """The reference itself: tanh-sinh converged, K-node Gauss-Legendre close, E_law NELBO ~= H."""
    H = entropy(law)
    for case, (exact_NL, gl_NL) in reference.items():
        kind = CASES[case][3]
        coarser = time_integral(kind, law, tanh_sinh_times(0.14, 3.4))  # error of h=0.1 is far below this one's
        assert float((coarser - exact_NL).abs().max()) < 1e-6, case
        # masked: e(x, t) is a polynomial in t (the 1/(1-alpha) weight cancels), so GL is exact
        tol = 1e-12 if kind == "masked" else 2e-4
        assert float((gl_NL - exact_NL).sum(1).abs().max()) < tol, case
        # exact posteriors make the bound tight up to the eps truncation of [0, 1] (measured <= 0.014 nats)
        assert abs(float(law @ exact_NL.sum(1)) - H) < 0.03, (case, float(law @ exact_NL.sum(1)), H)


@pytest.mark.parametrize("case", list(CASES))
def test_estimate_nelbo_on_the_oracle_equals_enumeration_per_sequence(case, law, reference):
    """Each support sequence x (R copies, one batch): MC error over z/n only, stderr is pure MC."""
    exact_NL, gl_NL = reference[case]
    fn, oracle = build_eval_fn(case, law)
    z_scores, diffs, errs = [], [], []
    for i in range(N):
        x_BL = S_NL[i].expand(R, L).clone()
        res = estimate_nelbo(fn, [x_BL], num_t_samples=K, seed=100 + i, eps=EPS, method="quadrature", rank=0)
        assert res["num_tokens"] == R * L and res["num_sequences"] == R
        assert res["num_forward_calls"] == K and res["method"] == "quadrature"
        se = res["nll_stderr"]
        assert 0 < se < 0.05, (case, i, se)
        d_gl = res["nll"] - float(gl_NL[i].sum()) / L
        d_exact = res["nll"] - float(exact_NL[i].sum()) / L
        assert abs(d_gl) < 5 * se, (case, i, res["nll"], float(gl_NL[i].sum()) / L, se)
        assert abs(d_exact) < 5 * se + 1e-4, (case, i, res["nll"], float(exact_NL[i].sum()) / L, se)
        z_scores.append(d_gl / se)
        diffs.append(d_gl)
        errs.append(se)
    assert oracle.calls == N * K
    # pooled over the N independent sequences: the mean difference is within 4 of its own stderrs
    pooled_se = math.sqrt(sum(e * e for e in errs)) / N
    assert abs(sum(diffs) / N) < 4 * pooled_se, (case, sum(diffs) / N, pooled_se)
    # and the reported stderr is honest: the z-scores have unit spread (not over- nor under-stated)
    rms = math.sqrt(sum(z * z for z in z_scores) / N)
    assert 0.5 < rms < 1.6, (case, rms)


@pytest.mark.parametrize("case", list(CASES))
def test_estimate_nelbo_on_a_padded_data_set_drawn_from_the_law(case, law, reference):
    """Loader batches with padding: the token-weighted nll of the valid tokens and num_tokens."""
    exact_NL, _ = reference[case]
    gen = torch.Generator().manual_seed(5)
    batches, valid_count = [], 0
    total_exact = 0.0
    for size in (3000, 2000, 4000):
        idx_B = torch.multinomial(law, size, replacement=True, generator=gen)
        length_B = torch.randint(0, L + 1, (size,), generator=gen)  # 0: a fully padded row (skipped)
        valid_BL = torch.arange(L)[None, :] < length_B[:, None]
        x_BL = torch.where(valid_BL, S_NL[idx_B], torch.zeros((), dtype=torch.long))  # pad id 0 is a real token
        batches.append({"input_ids": x_BL, "valid": valid_BL})
        # the oracle conditions on the padded tokens too, so the reference uses the full padded x
        total_exact += float((exact_NL[seq_index(x_BL, V)] * valid_BL).sum())
        valid_count += int(valid_BL.sum())
    fn, _ = build_eval_fn(case, law)
    res = estimate_nelbo(fn, batches, num_t_samples=K, seed=7, eps=EPS, method="quadrature", rank=0)
    assert res["num_tokens"] == valid_count
    assert res["num_sequences"] == sum(int(b["valid"].any(-1).sum()) for b in batches)
    target = total_exact / valid_count
    se = res["nll_stderr"]
    assert 0 < se < 0.05
    assert abs(res["nll"] - target) < 4 * se + 1e-4, (case, res["nll"], target, se)
    assert res["ppl"] == pytest.approx(math.exp(res["nll"]), rel=1e-12)
