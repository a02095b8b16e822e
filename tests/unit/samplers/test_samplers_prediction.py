"""Categorical draws, temperature modes (docs/theory.md §5.2), nucleus (docs/theory.md §5.3) and the plug-in bridge identity,
checked exactly against the enumeration oracle."""

from __future__ import annotations

import pytest
import torch
from sampler_helpers import L, V, build, chi2, chi2_quantile, components, eo, law

from udmtrain.diffusion import functional as F
from udmtrain.diffusion.samplers import categorical as cat
from udmtrain.diffusion.samplers.base import SamplingRun

ALPHA = 0.45
TOL = 1e-10


def _run(z_BL, noise_BL=None):
    return SamplingRun(network=None, generator=torch.Generator().manual_seed(0), z_BL=z_BL,
                       noise_BL=noise_BL, prefix_BL=None, prefix_len=0)


def _state(seed=0, B=6):
    z = torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(seed))
    return z, torch.full((B, 1), ALPHA, dtype=torch.float64)


def _norm(logw):
    return torch.log_softmax(logw, -1)


def _own(z_BL):
    return torch.nn.functional.one_hot(z_BL, V).to(torch.float64)


C = V * ALPHA / (1 - ALPHA)  # c_t of docs/theory.md §1


# ----------------------------------------------------------------------------- categorical
def test_gumbel_argmax_frequencies_match_probs():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    draws = cat.sample_categorical(probs.log().expand(20000, 1, 4), g).reshape(-1)
    counts = torch.bincount(draws, minlength=4).to(torch.float64)
    assert chi2(counts, probs) < chi2_quantile(3)


def test_gumbel_topk_distinct_allowed_and_first_pick_law():
    g = torch.Generator().manual_seed(0)
    score = torch.tensor([[0.0, 1.0, 2.0, -1.0, 5.0]]).expand(20000, 5)
    allowed = torch.tensor([[True, True, True, True, False]]).expand(20000, 5)
    chosen = cat.gumbel_topk(score, 2, 1.0, g, allowed)
    assert bool((chosen.sum(-1) == 2).all()) and not bool(chosen[:, 4].any())
    first = cat.gumbel_topk(score, 1, 2.0, g, allowed).float().argmax(-1)
    p = torch.softmax(torch.tensor([0.0, 1.0, 2.0, -1.0], dtype=torch.float64) / 2.0, 0)
    assert chi2(torch.bincount(first, minlength=4).to(torch.float64), p) < chi2_quantile(3)


def test_top_p_keeps_smallest_prefix_with_mass_at_least_p():
    p = torch.tensor([[[0.15, 0.5, 0.05, 0.3]]], dtype=torch.float64)
    out = cat.top_p_filter(p.log(), 0.8).exp()
    assert torch.allclose(out, torch.tensor([[[0.0, 0.625, 0.0, 0.375]]], dtype=torch.float64), atol=TOL)
    assert torch.allclose(cat.top_p_filter(p.log(), 0.81).exp()[..., 2], torch.zeros(1, 1, dtype=torch.float64))
    assert (cat.top_p_filter(p.log(), 0.81).exp() > 0).sum() == 3
    assert torch.equal(cat.top_p_filter(p.log(), 1e-6).exp() > 0, p == p.max())  # top-1 always kept
    assert torch.equal(cat.top_p_filter(p.log(), 1.0), p.log())
    # brute force on random rows
    rows = torch.distributions.Dirichlet(torch.ones(7, dtype=torch.float64)).sample((200,))
    for top_p in (0.3, 0.6, 0.9):
        kept = cat.top_p_filter(rows.log(), top_p).exp() > 0
        for r, k in zip(rows, kept):
            order = torch.argsort(r, descending=True)
            n = int(torch.searchsorted(torch.cumsum(r[order], 0), torch.tensor(top_p, dtype=torch.float64))) + 1
            expect = torch.zeros(7, dtype=torch.bool)
            expect[order[:n]] = True
            assert torch.equal(k, expect)


# ----------------------------------------------------------------------------- temperature
def _exact(z, kind):
    fn = {"loo": eo.exact_loo, "denoiser": eo.exact_denoiser}[kind]
    return fn(law(1), V, L, z, ALPHA)


@pytest.mark.parametrize("param", ["loo", "denoiser"])
@pytest.mark.parametrize("mode", ["auto", "loo", "denoiser", "logits"])
def test_temperature_one_changes_nothing(param, mode):
    z, a = _state()
    smp = build("ancestral", "uniform", param, temperature=1.0, temperature_on=mode)
    logits = _exact(z, "loo" if param == "loo" else "denoiser")
    for want in ("loo", "denoiser"):
        got = smp.prediction_from_logits(logits, _run(z), a, want)
        assert torch.allclose(got, _exact(z, want), atol=TOL), (want, mode)


@pytest.mark.parametrize("param", ["loo", "denoiser"])
def test_temperature_modes_uniform_exact(param):
    T = 0.7
    z, a = _state()
    Lo, D = _exact(z, "loo"), _exact(z, "denoiser")
    logits = Lo if param == "loo" else D
    own = _own(z)

    def pred(mode, want):
        smp = build("ancestral", "uniform", param, temperature=T, temperature_on=mode)
        return smp.prediction_from_logits(logits, _run(z), a, want)

    # 'loo' (= 'auto' for uniform): tempered LOO, the paper's LOO temperature sampling
    assert torch.allclose(pred("loo", "loo"), _norm(Lo / T), atol=TOL)
    assert torch.allclose(pred("auto", "loo"), _norm(Lo / T), atol=TOL)
    # ... converted exactly to the denoiser by Bayes: D' ∝ Lo^{1/T} (1 + c 1[v=i])
    assert torch.allclose(pred("loo", "denoiser"), _norm(Lo / T + torch.log1p(C * own)), atol=TOL)
    # 'denoiser': tempered D; its LOO ∝ D^{1/T} / (1 + c 1[v=i])
    assert torch.allclose(pred("denoiser", "denoiser"), _norm(D / T), atol=TOL)
    assert torch.allclose(pred("denoiser", "loo"), _norm(D / T - torch.log1p(C * own)), atol=TOL)
    # 'logits': raw logits / T before the parameterization's conversion (docs/theory.md §5.2 consequences)
    if param == "loo":
        assert torch.allclose(pred("logits", "loo"), _norm(Lo / T), atol=TOL)
    else:  # a denoiser network: Lo' ∝ Lo^{1/T} (1+c)^{(1/T - 1) 1[v=i]} -- tempers the own-token evidence
        expect = _norm(Lo / T + (1 / T - 1) * torch.log1p(torch.tensor(C)) * own)
        assert torch.allclose(pred("logits", "loo"), expect, atol=TOL)
        assert torch.allclose(pred("logits", "denoiser"), _norm(D / T), atol=TOL)


def test_temperature_masked_and_audm_denoiser_mode():
    T = 1.6
    data = law(2)
    z = torch.tensor([[3, 0, 3], [1, 3, 2], [3, 3, 3]])  # 3 = mask id
    a = torch.full((3, 1), ALPHA, dtype=torch.float64)
    D = eo.exact_masked_denoiser(data, V, L, z, ALPHA)
    smp = build("ancestral", "masked", temperature=T)
    got = smp.prediction_from_logits(D, _run(z), a, "denoiser").exp()
    masked = z == V
    expect = torch.softmax(D[..., :V] / T, -1)
    assert torch.allclose(got[..., :V][masked], expect[masked], atol=TOL)
    assert torch.allclose(got[~masked], torch.nn.functional.one_hot(z[~masked], V + 1).double(), atol=TOL)
    # AUDM: active positions tempered, inactive ones stay one-hot (carry-over)
    n = torch.tensor([[0, 0, 1], [1, 2, 2], [0, 1, 2]])
    zA = torch.tensor([[0, 0, 2], [1, 1, 2], [0, 1, 0]])
    PA = eo.exact_audm_posterior(data, V, L, zA, n, ALPHA)
    smpA = build("ancestral", "absorbing_uniform", temperature=T)
    gotA = smpA.prediction_from_logits(PA, _run(zA, n), a, "denoiser").exp()
    act = zA == n
    assert torch.allclose(gotA[act], torch.softmax(PA[act] / T, -1), atol=TOL)
    assert torch.allclose(gotA[~act], torch.nn.functional.one_hot(zA[~act], V).double(), atol=TOL)


def test_top_p_applies_to_the_tempered_object_the_kernel_consumes():
    z, a = _state()
    Lo = _exact(z, "loo")
    smp = build("ancestral", "uniform", "loo", temperature=0.8, top_p=0.7)
    got = smp.prediction_from_logits(Lo, _run(z), a, "loo")
    assert torch.allclose(got, cat.top_p_filter(_norm(Lo / 0.8), 0.7), atol=TOL)
    assert bool((got.exp() == 0).any())


def test_bad_temperature_settings_are_rejected():
    with pytest.raises(ValueError, match="temperature_on='loo' needs the uniform process"):
        build("ancestral", "masked", temperature_on="loo")
    with pytest.raises(ValueError, match="temperature must be > 0"):
        build("ancestral", "uniform", temperature=0.0)
    with pytest.raises(ValueError, match="top_p must be in"):
        build("ancestral", "uniform", top_p=1.5)


# ----------------------------------------------------------------------------- plug-in bridge
def test_plugin_bridge_fed_loo_is_denoiser_mixture_of_exact_bridges():
    z, _ = _state(seed=4, B=8)
    at = torch.full((8, 1), 0.35, dtype=torch.float64)
    as_ = torch.full((8, 1), 0.6, dtype=torch.float64)
    Lo = eo.exact_loo(law(3), V, L, z, 0.35).exp()
    D = eo.exact_denoiser(law(3), V, L, z, 0.35).exp()
    mixture = sum(D[..., v:v + 1] * F.uniform_bridge(torch.nn.functional.one_hot(torch.full_like(z, v), V).double(),
                                                      z, at, as_) for v in range(V))
    assert torch.allclose(F.uniform_bridge(Lo, z, at, as_), mixture, atol=TOL)
    assert not torch.allclose(F.uniform_bridge(D, z, at, as_), mixture, atol=1e-3)  # plugging D is wrong
    assert components("uniform")[1].num_states == V
