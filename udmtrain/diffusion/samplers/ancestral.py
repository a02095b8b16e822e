"""Ancestral samplers: MDLM (masked), UDLM plug-in bridge (uniform), AUDM (absorbing_uniform), max-coupling.

Shape legend: ``B`` batch, ``L`` length, ``V`` states (``process.num_states``); ``*_probs_BLV`` are
probability vectors per position (float32/64), ``alpha_t_B1`` / ``alpha_s_B1`` float64 ``[B, 1]``,
``s < t``.

The kernels are plain functions so the predictor-corrector sampler reuses them. Each draws every
position independently given ``z_t`` (the usual factorised reverse step): exact per position, and
exact for the joint law as the number of steps grows (then at most one position changes per step).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from udmtrain.diffusion.samplers import categorical as cat
from udmtrain.diffusion.samplers.base import Sampler, SamplingRun
from udmtrain.registry import SAMPLER


def mdlm_step(den_probs_BLV, z_BL, alpha_t_B1, alpha_s_B1, mask_id: int, generator) -> torch.Tensor:
    """MDLM ancestral update (SPEC 5.4): ``z_s ~ Cat((a_s - a_t) x̂ + (1 - a_s) e_{z_t})`` at masked
    positions (the weights sum to ``1 - a_t``; the draw needs no normalisation); clean tokens are
    frozen whatever the prediction says. The mask column of ``x̂`` is ignored."""
    a_t, a_s = alpha_t_B1.to(torch.float64), alpha_s_B1.to(torch.float64)
    z_s = cat.sample_mixture(generator, dense_BLV=cat.drop_state(den_probs_BLV, mask_id), dense_weight=a_s - a_t,
                             atoms=[(z_BL, 1 - a_s)])
    return torch.where(z_BL == mask_id, z_s, z_BL)


def uniform_plugin_step(loo_probs_BLV, z_BL, alpha_t_B1, alpha_s_B1, generator) -> torch.Tensor:
    """UDLM reverse step (SPEC 1.2, 5.4): ``z_s ~ N(x̂)/Z(x̂)``, the bridge with ``x̂ = Lo`` plugged in.

    Must be fed the LOO (SPEC 10.8): by linearity of ``N``, ``N(Lo)/Z(Lo) = sum_v D(v) q(z_s | z_t, v)``,
    the exact posterior mixture of bridges; plugging ``D`` double-counts the own token.
    ``N = (a_s - a_t) x̂ + (a_s - a_t)(1 - a_s)/(V a_s) 1 + (V a_t x̂(z) + a_t/a_s - a_t) e_z`` (the
    terms of ``functional.uniform_bridge``) is drawn as that mixture, without forming it.
    """
    V = loo_probs_BLV.shape[-1]
    a_t, a_s = alpha_t_B1.to(torch.float64), alpha_s_B1.to(torch.float64)
    x_z_BL = loo_probs_BLV.gather(-1, z_BL[..., None]).squeeze(-1).to(torch.float64)
    return cat.sample_mixture(generator, dense_BLV=loo_probs_BLV, dense_weight=a_s - a_t,
                              atoms=[(z_BL, V * a_t * x_z_BL + a_t / a_s - a_t)],
                              uniform_weight=(a_s - a_t) * (1 - a_s) / (V * a_s), num_states=V)


def max_coupling_step(den_probs_BLV, z_BL, alpha_t_B1, alpha_s_B1, generator) -> torch.Tensor:
    """Max-coupling kernel (SPEC 3.3, 5.4): ``z_s ~ Cat((a_s-a_t)/(1-a_t) D + (1-a_s)/(1-a_t) e_{z_t})``."""
    a_t, a_s = alpha_t_B1.to(torch.float64), alpha_s_B1.to(torch.float64)
    return cat.sample_mixture(generator, dense_BLV=den_probs_BLV, dense_weight=(a_s - a_t) / (1 - a_t),
                              atoms=[(z_BL, (1 - a_s) / (1 - a_t))])


def audm_step(den_probs_BLV, z_BL, noise_BL, alpha_t_B1, alpha_s_B1, generator) -> torch.Tensor:
    """AUDM ancestral update (SPEC 4): MDLM with the per-position mask token ``n``.

    Active positions (``z = n``) draw ``z_s ~ Cat((a_s - a_t) p + (1 - a_s) e_{z_t})`` (they stay at
    ``n`` w.p. ``((1-a_s) + (a_s-a_t) p(n)) / (1-a_t)``); inactive ones (``z != n``) are clean and
    frozen; ``n`` never changes.
    """
    a_t, a_s = alpha_t_B1.to(torch.float64), alpha_s_B1.to(torch.float64)
    z_s = cat.sample_mixture(generator, dense_BLV=den_probs_BLV, dense_weight=a_s - a_t, atoms=[(z_BL, 1 - a_s)])
    return torch.where(z_BL == noise_BL, z_s, z_BL)


# ---------------------------------------------------------------------------- step functions
# ``step(sampler, run, t, s)`` updates ``run`` in place; shared with the predictor-corrector sampler.

def step_uniform_plugin(sampler: Sampler, run: SamplingRun, t: float, s: float) -> None:
    """Uniform process: plug-in bridge fed the (tempered, truncated) LOO of the model."""
    a_t, a_s = sampler.alpha_B1(t, run), sampler.alpha_B1(s, run)
    loo = sampler.predict(run, t, "loo", alpha_B1=a_t)
    run.z_BL = uniform_plugin_step(loo.exp(), run.z_BL, a_t, a_s, run.generator)


def step_max_coupling(sampler: Sampler, run: SamplingRun, t: float, s: float) -> None:
    """Uniform process: max-coupling kernel with the model's denoiser."""
    a_t, a_s = sampler.alpha_B1(t, run), sampler.alpha_B1(s, run)
    den = sampler.predict(run, t, "denoiser", alpha_B1=a_t)
    run.z_BL = max_coupling_step(den.exp(), run.z_BL, a_t, a_s, run.generator)


def step_audm(sampler: Sampler, run: SamplingRun, t: float, s: float) -> None:
    """Absorbing-uniform process: AUDM carry-over update with the model's posterior ``p(x | z, n)``."""
    a_t, a_s = sampler.alpha_B1(t, run), sampler.alpha_B1(s, run)
    den = sampler.predict(run, t, "denoiser", alpha_B1=a_t)
    run.z_BL = audm_step(den.exp(), run.z_BL, run.noise_BL, a_t, a_s, run.generator)


def step_mdlm(sampler: Sampler, run: SamplingRun, t: float, s: float, use_cache: bool = False) -> None:
    """Masked process: MDLM update; with ``use_cache`` the prediction is reused while z is unchanged
    (SPEC 10.17: exact only for a network that ignores time, since the cached call was made at an
    earlier t). The cache lives in ``run.cache`` and costs no NFE when hit."""
    a_t, a_s = sampler.alpha_B1(t, run), sampler.alpha_B1(s, run)
    cached = run.cache.get("mdlm")
    if use_cache and cached is not None and torch.equal(cached[0], run.z_BL):
        probs = cached[1]
    else:
        probs = sampler.predict(run, t, "denoiser", alpha_B1=a_t).exp()
        if use_cache:
            run.cache["mdlm"] = (run.z_BL.clone(), probs)
    run.z_BL = mdlm_step(probs, run.z_BL, a_t, a_s, sampler.mask_id, run.generator)


@SAMPLER.register("ancestral")
class AncestralSampler(Sampler):
    """The process's own ancestral sampler: MDLM (masked), UDLM plug-in bridge with the LOO
    (uniform; a denoiser network is converted to the LOO by the parameterization, never plugged in
    directly, SPEC 10.8) or AUDM (absorbing_uniform). ``num_steps`` network calls, except that the
    masked cache may skip calls whose state did not change."""

    @dataclass(kw_only=True, frozen=True)
    class Config(Sampler.Config):
        cache: bool = True
        """Masked process only: reuse the last prediction while z is unchanged (saves NFE). Valid
        only when the network ignores time (MDLM default); ignored for uniform/absorbing_uniform."""
        time_conditioned: bool = False
        """Masked process only: the network uses its time input, so the cache is disabled."""

    requires: ClassVar = {}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The reverse kernel is chosen once, from the process (masked -> MDLM, uniform -> plug-in
        # bridge fed the LOO, absorbing_uniform -> AUDM carry-over).
        use_cache = self.cfg.cache and not self.cfg.time_conditioned
        self.kernel = {
            "masked": functools.partial(step_mdlm, use_cache=use_cache),
            "uniform": step_uniform_plugin,
            "absorbing_uniform": step_audm,
        }[self.kind]

    def generate(self, run: SamplingRun) -> None:
        """Step from t = 1 to t = 0 on the uniform grid with the process's kernel."""
        times = self.time_grid(self.cfg.num_steps)
        for t, s in zip(times[:-1], times[1:]):
            self.kernel(self, run, t, s)
            self.record(run)


@SAMPLER.register("max_coupling")
class MaxCouplingSampler(Sampler):
    """Uniform process: the maximal-coupling reverse kernel with the model's denoiser (SPEC 3.3, 5.4).

    Given ``x`` the kernel preserves ``q_s(.|x)``; averaging it with the exact denoiser therefore
    preserves the marginal of z, so an exact model reproduces the data law as the steps grow (the
    factorised per-position draw is the only error). Its NELBO is loose (SPEC 3.3), its sampler is not."""

    requires: ClassVar = {"process": frozenset({"uniform"})}

    def generate(self, run: SamplingRun) -> None:
        """``num_steps`` max-coupling steps from t = 1 to 0."""
        times = self.time_grid(self.cfg.num_steps)
        for t, s in zip(times[:-1], times[1:]):
            step_max_coupling(self, run, t, s)
            self.record(run)
