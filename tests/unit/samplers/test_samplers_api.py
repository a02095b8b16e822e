"""Sampler contract: registration, NFE == network calls, seeds, prefix clamping, errors."""

from __future__ import annotations

import math

import pytest
import torch
from sampler_helpers import L, V, build, chi2, chi2_quantile, components, eo, law, network

from udmtrain.registry import SAMPLER

# every (sampler, process, parameterization, extra config) pairing that must work
COMBOS = [
    ("ancestral", "masked", "denoiser", {"cache": False}),
    ("ancestral", "uniform", "loo", {}),
    ("ancestral", "uniform", "denoiser", {}),
    ("ancestral", "absorbing_uniform", "denoiser", {}),
    ("max_coupling", "uniform", "denoiser", {}),
    ("remdm", "masked", "denoiser", {"sigma_schedule": "loop"}),
    ("reaudm", "absorbing_uniform", "denoiser", {}),
    ("pc_gibbs", "uniform", "loo", {}),
    ("pc_gibbs", "uniform", "denoiser", {"predictor": "max_coupling", "selection": "lowest_maxprob"}),
    ("pc_gibbs", "absorbing_uniform", "denoiser", {"selection": "lowest_current_prob"}),
    ("pc_gibbs", "absorbing_uniform", "denoiser", {"predictor": "reaudm", "k_parallel": 2}),
    ("confidence", "masked", "denoiser", {}),
    ("confidence", "uniform", "loo", {}),
    ("confidence", "absorbing_uniform", "denoiser", {}),
]
IDS = [f"{c[0]}-{c[1]}-{c[2]}-{len(c[3])}" for c in COMBOS]
ORACLE = {"loo": "loo"}


def _sample(combo, steps=7, seed=0, batch=64, **kw):
    name, process, param, cfg = combo
    smp = build(name, process, param, num_steps=steps, **{**cfg, **kw.pop("cfg", {})})
    net = network(process, law(0), ORACLE.get(param) if process == "uniform" else None)
    out = smp.sample(net, batch, L, torch.Generator().manual_seed(seed), **kw)
    return out, net


def test_registry_names():
    assert {"ancestral", "max_coupling", "remdm", "reaudm", "pc_gibbs", "confidence"} <= set(SAMPLER.names())
    assert SAMPLER.get("remdm").needs == {"mask_state"}
    assert SAMPLER.get("pc_gibbs").needs == {"gibbs_corrector"}


@pytest.mark.parametrize("combo", COMBOS, ids=IDS)
@pytest.mark.parametrize("steps", [1, 7])
def test_nfe_counts_network_calls_and_meets_the_budget(combo, steps):
    out, net = _sample(combo, steps=steps)
    assert out.nfe == net.calls == steps
    assert out.tokens_BL.shape == (64, L) and out.tokens_BL.dtype == torch.long
    assert int(out.tokens_BL.min()) >= 0 and int(out.tokens_BL.max()) < V  # never the mask
    assert (out.noise_BL is not None) == (combo[1] == "absorbing_uniform")


def test_masked_cache_skips_calls_only_when_allowed():
    combo = ("ancestral", "masked", "denoiser", {})
    out, net = _sample(combo, steps=64, batch=1)
    assert out.nfe == net.calls < 64  # one sequence of 3 tokens changes in at most 3 steps
    assert out.nfe <= L + 1
    # a time-conditioned network (a fact about the model, passed by the builder) never uses the cache
    cls = SAMPLER.get("ancestral")
    smp = cls(cls.Config(num_steps=64), *components("masked"), time_conditioning=True)
    net_tc = network("masked", law(0))
    out_tc = smp.sample(net_tc, 1, L, torch.Generator().manual_seed(0))
    assert out_tc.nfe == net_tc.calls == 64
    # the cache does not change the law of a time-independent network: same seed, same samples
    nocache, _ = _sample(combo, steps=64, batch=1, cfg={"cache": False})
    assert torch.equal(out.tokens_BL, nocache.tokens_BL)


@pytest.mark.parametrize("combo", COMBOS, ids=IDS)
def test_same_seed_same_samples_different_seed_different(combo):
    a, _ = _sample(combo, seed=5)
    b, _ = _sample(combo, seed=5)
    c, _ = _sample(combo, seed=6)
    assert torch.equal(a.tokens_BL, b.tokens_BL)
    if combo[0] == "confidence" and combo[1] != "uniform":
        # greedy: the seed only enters through the prior (all-mask for MDLM), so it is irrelevant here
        return
    assert not torch.equal(a.tokens_BL, c.tokens_BL)


@pytest.mark.parametrize("combo", COMBOS, ids=IDS)
def test_prefix_stays_clamped_at_every_step(combo):
    prefix = torch.randint(0, V, (64, L), generator=torch.Generator().manual_seed(9))
    out, _ = _sample(combo, prefix_BL=prefix, prefix_len=2, cfg={"record_trajectory": True})
    assert len(out.trajectory) >= 7
    for z in out.trajectory + (out.tokens_BL,):
        assert torch.equal(z[:, :2], prefix[:, :2])
    if out.noise_BL is not None:  # AUDM prefix marked certainly clean
        assert bool((out.noise_BL[:, :2] != prefix[:, :2]).all())


@pytest.mark.parametrize("process,sampler", [("masked", "ancestral"), ("absorbing_uniform", "ancestral"),
                                             ("absorbing_uniform", "reaudm")])
def test_prefix_conditioning_is_exact_for_carry_over_processes(process, sampler):
    data = law(0)
    prefix = torch.tensor([[2, 0, 0]]).expand(4000, L)
    smp = build(sampler, process, num_steps=64)
    out = smp.sample(network(process, data), 4000, L, torch.Generator().manual_seed(2),
                     prefix_BL=prefix, prefix_len=1)
    cond = data.reshape(V, V**(L - 1))[2]
    cond = cond / cond.sum()
    counts = torch.bincount(eo.seq_index(out.tokens_BL[:, 1:], V), minlength=V**(L - 1)).double()
    assert chi2(counts, cond) < chi2_quantile(V**(L - 1) - 1)


def test_confidence_is_greedy_and_unmasks_ceil_l_over_steps_per_call():
    smp = build("confidence", "masked", num_steps=2)
    out = smp.sample(network("masked", law(0)), 5, L, torch.Generator().manual_seed(0),)
    assert out.nfe == 2 and int(out.tokens_BL.max()) < V  # k = ceil(3/2) = 2 per call covers L = 3
    # with one step per position, every sequence is the greedy (argmax) completion: deterministic
    a = build("confidence", "masked", num_steps=L).sample(network("masked", law(0)), 4, L,
                                                          torch.Generator().manual_seed(1))
    assert bool((a.tokens_BL == a.tokens_BL[0]).all())
    assert math.ceil(L / 2) == 2


def test_incompatible_settings_raise_clear_errors():
    with pytest.raises(ValueError, match=r"sampler 'remdm' works with process \['masked'\], not 'uniform'"):
        build("remdm", "uniform")
    with pytest.raises(ValueError, match="works with process"):
        build("pc_gibbs", "masked")
    with pytest.raises(ValueError, match="predictor='reaudm' does not apply to process 'uniform'"):
        build("pc_gibbs", "uniform", predictor="reaudm")
    with pytest.raises(ValueError, match="loop"):
        build("remdm", "masked", sigma_schedule="loop", t_on=0.1, t_off=0.5)
    smp = build("ancestral", "uniform", num_steps=2)
    net = network("uniform", law(0))
    with pytest.raises(ValueError, match="no prefix_BL was given"):
        smp.sample(net, 2, L, torch.Generator(), prefix_len=1)
    with pytest.raises(ValueError, match=r"prefix tokens must be real tokens in \[0, 3\)"):
        smp.sample(net, 2, L, torch.Generator(), prefix_BL=torch.full((2, L), 3), prefix_len=1)
    with pytest.raises(ValueError, match="num_steps must be >= 1"):
        build("ancestral", "uniform", num_steps=0)
