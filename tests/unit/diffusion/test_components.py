"""Registered diffusion components: schedules, processes, parameterizations, losses, objectives, times."""

import math

import pytest
import torch

from enum_oracle import ExactNetwork, all_sequences, random_law
from udmtrain.diffusion.losses import nelbo_loss_for
from udmtrain.diffusion.objective import ARObjective, DiffusionObjective
from udmtrain.diffusion.process import Noised
from udmtrain.diffusion.time_sampling import antithetic_times, iid_times, sample_times
from udmtrain.registry import LOSS, PARAMETERIZATION, PROCESS, SCHEDULE

V = 7


@pytest.mark.parametrize("name", ["loglinear", "cosine"])
def test_schedules(name):
    sched = SCHEDULE.build(name, SCHEDULE.get(name).Config(eps=1e-3))
    t = torch.tensor([0.0, 0.3, 0.7, 1.0], dtype=torch.float64)
    a, da = sched.alpha(t)
    assert a[0] == 1.0 and math.isclose(a[-1].item(), 1e-3, rel_tol=1e-12)
    assert (a[1:] < a[:-1]).all() and (da <= 0).all()
    h = 1e-6
    fd = (sched.alpha(t[1:3] + h)[0] - sched.alpha(t[1:3] - h)[0]) / (2 * h)
    assert torch.allclose(fd, da[1:3], atol=1e-8)
    assert torch.allclose(sched.sigma(t), -torch.log(a))
    with pytest.raises(ValueError, match="eps must lie in"):
        SCHEDULE.get(name).Config(eps=0.0)


@pytest.mark.parametrize("name", ["masked", "uniform", "absorbing_uniform"])
def test_process_corruption_frequencies_and_prior(name):
    proc = PROCESS.build(name, vocab_size=V)
    assert proc.num_states == (V + 1 if name == "masked" else V)
    assert proc.mask_id == (V if name == "masked" else None)
    assert proc.uses_noise_tokens == (name == "absorbing_uniform")
    gen = torch.Generator().manual_seed(0)
    B, L, a = 100, 1000, 0.3
    x0 = torch.randint(0, V, (B, L), generator=gen)
    noised = proc.corrupt(x0, torch.full((B, 1), a), gen)
    changed = (noised.xt_BL != x0).double().mean().item()
    expected = (1 - a) if name == "masked" else (1 - a) * (V - 1) / V
    assert abs(changed - expected) < 4 * math.sqrt(expected * (1 - expected) / x0.numel())
    if name == "masked":
        assert set(noised.xt_BL.unique().tolist()) <= set(range(V + 1)) and noised.noise_BL is None
    else:  # exactly V states (docs/theory.md §10.5): the replacement token is uniform over 0..V-1
        counts = torch.bincount(noised.xt_BL[noised.xt_BL != x0], minlength=V)
        assert len(counts) == V and counts.min() > 0.9 * counts.float().mean()
    if name == "absorbing_uniform":  # z is n w.p. 1-alpha else x; n is fresh uniform noise
        n, z = noised.noise_BL, noised.xt_BL
        assert ((z == n) | (z == x0)).all()
        is_n = ((z == n) & (n != x0)).double().mean().item()
        assert abs(is_n - (1 - a) * (V - 1) / V) < 0.005
    prior = proc.prior(3, 5, gen, "cpu")
    assert prior.xt_BL.shape == (3, 5)
    if name == "masked":
        assert (prior.xt_BL == V).all()
    if name == "absorbing_uniform":
        assert torch.equal(prior.xt_BL, prior.noise_BL)


def test_corruption_is_reproducible_with_a_generator():
    proc = PROCESS.build("absorbing_uniform", vocab_size=V)
    x0 = torch.randint(0, V, (4, 9))
    a = torch.full((4, 1), 0.5)
    n1 = proc.corrupt(x0, a, torch.Generator().manual_seed(5))
    n2 = proc.corrupt(x0, a, torch.Generator().manual_seed(5))
    assert torch.equal(n1.xt_BL, n2.xt_BL) and torch.equal(n1.noise_BL, n2.noise_BL)


def test_carry_over_masked_and_absorbing_uniform():
    gen = torch.Generator().manual_seed(1)
    masked = PROCESS.build("masked", vocab_size=V)
    param = PARAMETERIZATION.build("denoiser", process=masked)
    xt = torch.tensor([[V, 2, V, 0]])
    logp = param.denoiser_logp(torch.randn(1, 4, V + 1, generator=gen, dtype=torch.bfloat16), xt, torch.full((1, 1), 0.5))
    assert logp.dtype == torch.float32
    probs = logp.exp()
    assert (probs[..., V] == 0).all()  # zero mass on the mask everywhere
    assert probs[0, 1, 2] == 1 and probs[0, 3, 0] == 1  # clean tokens copied
    assert torch.allclose(probs.sum(-1), torch.ones(1, 4))
    assert (probs[0, 0, :V] > 0).all()
    au = PROCESS.build("absorbing_uniform", vocab_size=V)
    param = PARAMETERIZATION.build("denoiser", process=au)
    z, n = torch.tensor([[3, 1, 4]]), torch.tensor([[3, 2, 4]])
    probs = param.denoiser_logp(torch.randn(1, 3, V, generator=gen), z, torch.full((1, 1), 0.5), n).exp()
    assert probs[0, 1, 1] == 1 and (probs[0, 0] > 0).all() and (probs[0, 2] > 0).all()
    with pytest.raises(ValueError, match="noise tokens"):
        param.denoiser_logp(torch.randn(1, 3, V), z, torch.full((1, 1), 0.5))
    with pytest.raises(ValueError, match="uniform process only"):
        param.loo_logp(torch.randn(1, 3, V), z, torch.full((1, 1), 0.5), n)
    with pytest.raises(ValueError, match="width 5"):
        param.denoiser_logp(torch.randn(1, 3, 5), z, torch.full((1, 1), 0.5), n)


def test_requires_are_declared_and_enforced():
    assert PARAMETERIZATION.requirements("loo") == {"process": frozenset({"uniform"})}
    assert LOSS.requirements("mdlm_nelbo") == {"process": frozenset({"masked"})}
    assert LOSS.requirements("plugin_nelbo") == {"process": frozenset({"uniform"})}
    assert LOSS.requirements("audm_nelbo") == {"process": frozenset({"absorbing_uniform"})}
    assert LOSS.requirements("cross_entropy") == {}
    assert LOSS.requirements("ar_nll") == {"model": frozenset({"ar_transformer"})}
    masked = PROCESS.build("masked", vocab_size=V)
    with pytest.raises(ValueError, match="needs process uniform"):
        LOSS.build("plugin_nelbo", process=masked)
    with pytest.raises(ValueError, match="uniform process only"):
        PARAMETERIZATION.build("loo", process=masked)
    with pytest.raises(ValueError, match="bound must be"):
        LOSS.get("cross_entropy").Config(bound="elbo")
    ce = LOSS.build("cross_entropy", process=masked)
    assert type(nelbo_loss_for(ce, masked)).registry_name == "mdlm_nelbo"
    uni = PROCESS.build("uniform", vocab_size=V)
    ce = LOSS.build("cross_entropy", LOSS.get("cross_entropy").Config(bound="max_coupling_nelbo"), process=uni)
    assert type(nelbo_loss_for(ce, uni)).registry_name == "max_coupling_nelbo"
    with pytest.raises(ValueError, match="needs process absorbing_uniform"):
        nelbo_loss_for(LOSS.build("cross_entropy", LOSS.get("cross_entropy").Config(bound="audm_nelbo"),
                                  process=uni), uni)


class TinyNet(torch.nn.Module):
    """A random network with the diffusion interface (returns bf16 logits, like autocast would)."""

    def __init__(self, num_states, width=V):
        super().__init__()
        self.emb = torch.nn.Embedding(num_states, 8)
        self.out = torch.nn.Linear(9, width)

    def forward(self, xt_BL, sigma_B, noise_BL=None):
        h = self.emb(xt_BL) + (0 if noise_BL is None else self.emb(noise_BL))
        h = torch.cat([h, sigma_B[:, None, None].expand(*xt_BL.shape, 1).float()], -1)
        return self.out(h).bfloat16()


VALID = [(p, z, l) for p in ("masked", "uniform", "absorbing_uniform") for z in ("denoiser", "loo")
         for l in ("plugin_nelbo", "max_coupling_nelbo", "mdlm_nelbo", "audm_nelbo", "cross_entropy")
         if p in PARAMETERIZATION.requirements(z).get("process", {p}) and p in LOSS.requirements(l).get("process", {p})]


@pytest.mark.parametrize("proc_name,param_name,loss_name", VALID)
def test_every_valid_triple_composes(proc_name, param_name, loss_name):
    proc = PROCESS.build(proc_name, vocab_size=V)
    obj = DiffusionObjective(SCHEDULE.build("loglinear"), proc, PARAMETERIZATION.build(param_name, process=proc),
                             LOSS.build(loss_name, process=proc))
    net = TinyNet(proc.num_states, proc.num_states)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, V, (4, 6), generator=gen)
    valid = torch.ones(4, 6, dtype=torch.bool)
    valid[0, 3:] = False
    out = obj(net, x0, valid, antithetic_times(4, 0, 1), gen)
    assert out.num_tokens == 21 and torch.isfinite(out.loss) and torch.isfinite(out.nelbo_sum)
    assert out.loss.dtype == torch.float32 and out.nelbo_sum.item() >= 0
    assert math.isclose(out.loss.item(), out.loss_sum.item() / 21, rel_tol=1e-6)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())


def test_the_valid_triples_are_the_expected_ten():
    assert len(VALID) == 10  # masked: {mdlm, ce}; uniform: {plugin, mc, ce} x {denoiser, loo}; AUDM: {audm, ce}


def test_objective_with_the_exact_loo_network():
    law = random_law(3, 2, seed=0)
    proc = PROCESS.build("uniform", vocab_size=3)
    obj = DiffusionObjective(SCHEDULE.build("loglinear"), proc, PARAMETERIZATION.build("loo", process=proc),
                             LOSS.build("plugin_nelbo", process=proc))
    net = ExactNetwork(law, 3, 2, "loo")
    x0 = all_sequences(3, 2)
    out = obj(net, x0, torch.ones_like(x0, dtype=torch.bool), torch.full((9,), 0.5, dtype=torch.float64))
    assert net.calls == 1 and out.loss.dtype == torch.float64 and out.loss > 0
    assert torch.equal(out.nelbo_sum, out.loss_sum)


def test_ar_objective_is_the_exact_next_token_nll():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, V, generator=gen)
    x = torch.randint(0, V, (2, 5), generator=gen)
    valid = torch.ones(2, 5, dtype=torch.bool)
    valid[1, 4] = False
    out = ARObjective(LOSS.build("ar_nll"))(lambda x_BL: logits, x, valid)
    lp = torch.log_softmax(logits, -1)
    want = -sum(lp[b, l - 1, x[b, l]] for b in range(2) for l in range(1, 5) if valid[b, l])
    assert out.num_tokens == 7 and torch.allclose(out.loss_sum, want) and torch.allclose(out.loss, want / 7)


def test_antithetic_times_agree_across_ranks_and_are_stratified():
    G, step, seed, eps = 12, 7, 3, 1e-3
    full = antithetic_times(G, step, seed, eps)
    parts = torch.cat([antithetic_times(G, step, seed, eps, start=r * 3, count=3) for r in range(4)])
    assert torch.equal(full, parts)
    strata = ((full.double() - eps) / (1 - eps) * G).floor().long()
    assert torch.equal(strata, torch.arange(G))  # one time per stratum of [eps, 1]
    assert not torch.equal(full, antithetic_times(G, step + 1, seed, eps))
    assert not torch.equal(full, antithetic_times(G, step, seed + 1, eps))
    assert torch.equal(sample_times("antithetic", G, step, seed, eps), full)
    t = iid_times(4096, 0, 0, eps)
    assert t.min() >= eps and t.max() <= 1 and abs(t.mean().item() - 0.5) < 0.02
    with pytest.raises(ValueError, match="outside the global batch"):
        antithetic_times(8, 0, 0, eps, start=6, count=4)
    with pytest.raises(ValueError, match="time_sampling must be one of"):
        sample_times("sobol", 4, 0, 0)


def test_noised_is_a_plain_tuple():
    n = Noised(torch.zeros(1, 2, dtype=torch.long))
    assert n.noise_BL is None and n.xt_BL.shape == (1, 2)


def test_time_sampling_and_t_min_are_trainer_settings():
    from pathlib import Path

    from udmtrain.config import ConfigError, load_recipe

    recipe = str(Path(__file__).resolve().parents[3] / "recipes" / "mdlm.yaml")
    cfg = load_recipe(recipe, ["train.time_sampling=iid", "train.t_min=0.01"])
    assert (cfg.train.time_sampling, cfg.train.t_min) == ("iid", 0.01)
    assert not hasattr(cfg.loss.cfg, "time_sampling")
    with pytest.raises(ConfigError, match="train.time_sampling"):
        load_recipe(recipe, ["train.time_sampling=stratified"])
    with pytest.raises(ConfigError, match=r"train.t_min"):
        load_recipe(recipe, ["train.t_min=1.5"])
    with pytest.raises(ConfigError, match="loss.time_sampling"):
        load_recipe(recipe, ["loss.time_sampling=iid"])
