"""Ancestral samplers: the process's own reverse step, and the max-coupling kernel.

Shape legend: ``B`` batch, ``L`` length, ``V`` states (``process.num_states``); ``*_probs_BLV`` are
probability vectors per position (float32/64), ``alpha_t_B1`` / ``alpha_s_B1`` float64 ``[B, 1]``,
``s < t``.

``ancestral`` asks the process for its reverse step (``process.ancestral_step``: MDLM for ``masked``,
the UDLM plug-in bridge fed the LOO for ``uniform``, the AUDM carry-over update for
``absorbing_uniform``; the kernels live in ``udmtrain/diffusion/process.py``), fed the prediction the
process names (``process.ancestral_posterior``). Each kernel draws every position independently given
``z_t``: exact per position, and exact for the joint law as the number of steps grows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from udmtrain.diffusion.samplers import categorical as cat
from udmtrain.diffusion.samplers.base import Sampler, SamplingRun
from udmtrain.registry import SAMPLER


def max_coupling_step(den_probs_BLV, z_BL, alpha_t_B1, alpha_s_B1, generator) -> torch.Tensor:
    """Max-coupling kernel (docs/theory.md §3.3, 5.4): ``z_s ~ Cat((a_s-a_t)/(1-a_t) D + (1-a_s)/(1-a_t) e_{z_t})``."""
    a_t, a_s = alpha_t_B1.to(torch.float64), alpha_s_B1.to(torch.float64)
    return cat.sample_mixture(generator, dense_BLV=den_probs_BLV, dense_weight=(a_s - a_t) / (1 - a_t),
                              atoms=[(z_BL, (1 - a_s) / (1 - a_t))])


@SAMPLER.register("ancestral")
class AncestralSampler(Sampler):
    """The process's own ancestral sampler (``process.ancestral_step``): MDLM (masked), UDLM plug-in
    bridge with the LOO (uniform; a denoiser network is converted to the LOO by the parameterization,
    never plugged in directly, docs/theory.md §10.8) or AUDM (absorbing_uniform). ``num_steps`` network calls,
    except that the cache may skip calls whose state did not change."""

    @dataclass(kw_only=True, frozen=True)
    class Config(Sampler.Config):
        cache: bool = True
        """Reuse the last prediction while z is unchanged (saves NFE). Applied only when it is exact:
        the process declares 'time_free_posterior' (masked) and the network ignores time (the model's
        ``time_conditioning: false``, MDLM's default)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.use_cache = (self.cfg.cache and not self.time_conditioning
                          and "time_free_posterior" in self.process.capabilities)
        """Decided once: reuse predictions while z is unchanged (docs/theory.md §10)."""
        self.posterior = self.process.ancestral_posterior

    def step(self, run: SamplingRun, t: float, s: float) -> None:
        """One ``process.ancestral_step``; with ``use_cache`` the prediction is reused while z is
        unchanged (it lives in ``run.cache`` and costs no NFE when hit)."""
        a_t, a_s = self.alpha_B1(t, run), self.alpha_B1(s, run)
        cached = run.cache.get("ancestral")
        if self.use_cache and cached is not None and torch.equal(cached[0], run.z_BL):
            probs = cached[1]
        else:
            probs = cat.probs_from_logp(self.predict(run, t, self.posterior, alpha_B1=a_t))
            if self.use_cache:
                run.cache["ancestral"] = (run.z_BL.clone(), probs)
        run.z_BL, run.noise_BL = self.process.ancestral_step(probs, run.z_BL, run.noise_BL, a_t, a_s,
                                                             run.generator)


@SAMPLER.register("max_coupling")
class MaxCouplingSampler(Sampler):
    """The maximal-coupling reverse kernel with the model's denoiser (docs/theory.md §3.3, 5.4).

    Given ``x`` the kernel preserves ``q_s(.|x)`` for every process of the form
    ``alpha e_x + (1 - alpha) pi`` whose states are all tokens; averaging it with the exact denoiser
    therefore preserves the marginal of z, so an exact model reproduces the data law as the steps grow
    (the factorised per-position draw is the only error). Its NELBO is loose (docs/theory.md §3.3), its sampler
    is not. Any noise tokens are carried unchanged (a known-clean position has ``D = e_z``)."""

    needs: ClassVar = frozenset({"token_states"})

    def step(self, run: SamplingRun, t: float, s: float) -> None:
        """One max-coupling step with the model's denoiser."""
        a_t, a_s = self.alpha_B1(t, run), self.alpha_B1(s, run)
        den = self.predict(run, t, "denoiser", alpha_B1=a_t)
        run.z_BL = max_coupling_step(cat.probs_from_logp(den), run.z_BL, a_t, a_s, run.generator)
