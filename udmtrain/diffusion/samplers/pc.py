"""Informed predictor-corrector sampler (SPEC 5.5) for the uniform and absorbing-uniform processes.

Shape legend: ``B`` batch, ``L`` length, ``V`` tokens; ``cond_BLV`` log full conditionals of one site
given the rest, ``score_BL`` site-selection scores.

NFE accounting (SPEC 5.1): with ``c = corrector_steps`` and budget ``N = num_steps``,
``corrected = (N - 1) // (1 + c)`` predictor steps are each followed by ``c`` corrector sweeps and
``n_steps = N - corrected * c`` predictor steps are taken, so the network is called exactly N times
and the last step (to s = 0) is never corrected.

Corrector targets (each sweep = 1 network call at time s, temperature 1 and no nucleus, so it targets
the model's own time-s marginal; SPEC 10.2/10.3 fixed: the LOO comes from what the parameterization
returns, is normalised, and every draw uses the generator):

* uniform: ``p_s(z^l = v | z^{-l}) = a_s Lo(v) + (1 - a_s)/V`` (SPEC 2, ``functional.noisy_conditional``).
* absorbing_uniform, state ``(z, n)``. Per position, ``P(z=v, n=u | x) = [(1-a) 1[u=v] + a 1[v=x]] / V``.
  With ``Lo_A(x) = P(x^l = x | z^{-l}, n^{-l})`` the AUDM LOO,
  ``P(z^l=v, n^l=u | rest) = [(1-a) 1[u=v] + a Lo_A(v)] / V``. At an *active* site (``z^l = n^l = i``)
  the network's posterior is ``D_A(x) ∝ Lo_A(x) [(1-a) + a 1[x=i]]``, hence exactly
  ``log Lo_A = log D_A + log(1-a) e_i`` renormalised. At an inactive site (``z != n``) ``D_A = e_z``
  carries no information on ``Lo_A`` (it would need another call with that site changed), so the
  corrector moves only active sites and keeps them active: it draws from the conditional restricted
  to the set ``{z^l = n^l}``, ``P(z^l = n^l = v | rest, active) ∝ (1-a) + a Lo_A(v)``. Restricting a
  Gibbs update to a set containing the current value, and choosing among sites that the move keeps
  active, is reversible for the AUDM law (``pi(x) K(x,y) = pi(x) pi(y) / pi(A)`` is symmetric), so the
  ``random`` rule with ``k_parallel = 1`` leaves the exact time-s law invariant.

Site selection (SPEC 5.5): score per site, ``k = min(k_parallel, #eligible)`` sites drawn without
replacement by Gumbel-top-k on ``score / selection_tau``; they are resampled in parallel from their
conditionals. Only ``random`` with ``k_parallel = 1`` is an exact Gibbs kernel; informed rules (site
choice depends on the state) and ``k > 1`` (parallel updates) are approximations, as in the reference.
The prefix is never selected.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from udmtrain.diffusion.samplers import categorical as cat
from udmtrain.diffusion.samplers.ancestral import step_audm, step_max_coupling, step_uniform_plugin
from udmtrain.diffusion.samplers.base import Sampler, SamplingRun
from udmtrain.diffusion.samplers.reaudm import step_reaudm
from udmtrain.registry import SAMPLER

# (process kind, predictor name) -> step function
_PREDICTORS = {
    ("uniform", "ancestral"): step_uniform_plugin,
    ("uniform", "max_coupling"): step_max_coupling,
    ("absorbing_uniform", "ancestral"): step_audm,
    ("absorbing_uniform", "reaudm"): step_reaudm,
}


def nfe_split(num_steps: int, corrector_steps: int) -> tuple[int, int]:
    """``(n_steps, corrected)`` of SPEC 5.1: ``n_steps + corrected * corrector_steps == num_steps``."""
    if corrector_steps == 0:
        return num_steps, 0
    corrected = (num_steps - 1) // (1 + corrector_steps)
    return num_steps - corrected * corrector_steps, corrected


def audm_conditional(den_logp_BLV, z_BL, alpha_B1) -> torch.Tensor:
    """``log P(z^l = n^l = v | rest, active)`` from the AUDM posterior at active sites -> ``[B, L, V]``.

    ``log Lo_A = log_softmax(log D_A + log(1-a) e_{z})``; result ``log((1-a) + a Lo_A) - log(V(1-a) + a)``.
    Rows of inactive sites are meaningless (never selected).
    """
    V = den_logp_BLV.shape[-1]
    a = alpha_B1.to(den_logp_BLV.dtype)[..., None]
    shift = torch.zeros_like(den_logp_BLV).scatter_(-1, z_BL[..., None], 1.0) * torch.log1p(-a)
    loo = torch.log_softmax(den_logp_BLV + shift, dim=-1)
    return torch.logaddexp(torch.log1p(-a), torch.log(a) + loo) - torch.log(V * (1 - a) + a)


def selection_score(cond_BLV, z_BL, rule: str, generator) -> torch.Tensor:
    """Per-site score (higher = more likely to be resampled), SPEC 5.5 -> float64 ``[B, L]``."""
    cond = cond_BLV.to(torch.float64)
    current = cond.gather(-1, z_BL[..., None]).squeeze(-1)
    if rule == "lowest_log_margin":
        best_other = cond.scatter(-1, z_BL[..., None], float("-inf")).amax(-1)
        return -(current - best_other)
    if rule == "lowest_current_prob":
        return -current
    if rule == "lowest_maxprob":
        return -cond.amax(-1)
    return torch.zeros_like(current)  # random: Gumbel-top-k of zeros = uniform without replacement


@SAMPLER.register("pc_gibbs")
class PCGibbsSampler(Sampler):
    """Predictor (the process's ancestral kernel, or ``reaudm`` / ``max_coupling``) + informed Gibbs
    corrector at time s on the exact noisy conditional built from the LOO (see module docstring)."""

    @dataclass(kw_only=True, frozen=True)
    class Config(Sampler.Config):
        predictor: Literal["ancestral", "reaudm", "max_coupling"] = "ancestral"
        """Predictor kernel: 'ancestral' (uniform: plug-in bridge, absorbing_uniform: AUDM),
        'reaudm' (absorbing_uniform only) or 'max_coupling' (uniform only)."""
        corrector_steps: int = 2
        """Gibbs sweeps after each corrected predictor step (each one network call)."""
        k_parallel: int = 12
        """Sites resampled in parallel per sweep (1 = exact single-site Gibbs)."""
        selection: Literal["lowest_log_margin", "lowest_current_prob", "lowest_maxprob", "random"] = (
            "lowest_log_margin")
        """Site-selection rule (SPEC 5.5)."""
        selection_tau: float = 1.0
        """Temperature of the Gumbel-top-k site selection (> 0; large = close to uniform)."""

    requires: ClassVar = {"process": frozenset({"uniform", "absorbing_uniform"})}

    def __init__(self, cfg: Config, schedule, process, parameterization) -> None:
        super().__init__(cfg, schedule, process, parameterization)
        key = (self.kind, cfg.predictor)
        if key not in _PREDICTORS:
            ok = sorted(p for k, p in _PREDICTORS if k == self.kind)
            raise ValueError(f"sampler.predictor={cfg.predictor!r} does not apply to process {self.kind!r}; "
                             f"use one of {ok}")
        self._predictor = _PREDICTORS[key]
        if cfg.corrector_steps < 0 or cfg.k_parallel < 1 or not cfg.selection_tau > 0:
            raise ValueError(f"sampler needs corrector_steps >= 0, k_parallel >= 1, selection_tau > 0; got "
                             f"{cfg.corrector_steps}, {cfg.k_parallel}, {cfg.selection_tau}")

    def generate(self, run: SamplingRun) -> None:
        """Predictor steps on a uniform grid of ``n_steps``; the first ``corrected`` get sweeps."""
        n_steps, corrected = nfe_split(self.cfg.num_steps, self.cfg.corrector_steps)
        times = self.time_grid(n_steps)
        for k, (t, s) in enumerate(zip(times[:-1], times[1:])):
            self._predictor(self, run, t, s)
            self.record(run)
            if k < corrected and s > 0.0:
                for _ in range(self.cfg.corrector_steps):
                    self.corrector_sweep(run, s)
                    self.record(run)

    def conditional(self, run: SamplingRun, s: float) -> tuple[torch.Tensor, torch.Tensor]:
        """One network call at s -> (log full conditional ``[B, L, V]``, eligible sites ``[B, L]``)."""
        from udmtrain.diffusion import functional as F

        a = self.alpha_B1(s, run)
        logits = self.call_network(run, s)
        logits = logits if logits.dtype == torch.float64 else logits.float()
        a = a.to(logits.dtype)
        if self.kind == "uniform":
            loo = self.posterior_logp(logits, run, a, "loo")
            return F.noisy_conditional(loo, a), run.free_BL
        den = self.posterior_logp(logits, run, a, "denoiser")
        return audm_conditional(den, run.z_BL, a), run.free_BL & (run.z_BL == run.noise_BL)

    def corrector_sweep(self, run: SamplingRun, s: float) -> None:
        """Resample ``k_parallel`` selected eligible sites from their conditionals at time ``s``."""
        cond, eligible = self.conditional(run, s)
        score = selection_score(cond, run.z_BL, self.cfg.selection, run.generator)
        chosen = cat.gumbel_topk(score, self.cfg.k_parallel, self.cfg.selection_tau, run.generator, eligible)
        new = cat.sample_categorical(cond, run.generator)
        run.z_BL = torch.where(chosen, new, run.z_BL)
        if run.noise_BL is not None:  # AUDM: the site stays active, z = n = new value
            run.noise_BL = torch.where(chosen, new, run.noise_BL)

