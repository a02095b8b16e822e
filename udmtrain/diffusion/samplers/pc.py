"""Informed predictor-corrector sampler (docs/theory.md §5.5) for processes with a Gibbs corrector (uniform, absorbing-uniform).

Shape legend: ``B`` batch, ``L`` length, ``V`` tokens; ``cond_BLV`` log full conditionals of one site
given the rest, ``score_BL`` site-selection scores.

NFE accounting (docs/theory.md §5.1): with ``c = corrector_steps`` and budget ``N = num_steps``,
``corrected = (N - 1) // (1 + c)`` predictor steps are each followed by ``c`` corrector sweeps and
``n_steps = N - corrected * c`` predictor steps are taken, so the network is called exactly N times
and the last step (to s = 0) is never corrected.

Corrector targets (each sweep = 1 network call at time s, temperature 1 and no nucleus, so it targets
the model's own time-s marginal; docs/theory.md §10.2/10.3 fixed: the LOO comes from what the parameterization
returns, is normalised, and every draw uses the generator):

* uniform: ``p_s(z^l = v | z^{-l}) = a_s Lo(v) + (1 - a_s)/V`` (docs/theory.md §2, ``functional.noisy_conditional``).
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

Site selection (docs/theory.md §5.5): score per site, ``k = min(k_parallel, #eligible)`` sites drawn without
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
from udmtrain.diffusion.samplers.base import Sampler, SamplingRun
from udmtrain.registry import SAMPLER

PREDICTORS = ("ancestral", "reaudm", "max_coupling")
"""Samplers whose ``step`` may serve as the predictor (any registered sampler with a plain step would do)."""


def nfe_split(num_steps: int, corrector_steps: int) -> tuple[int, int]:
    """``(n_steps, corrected)`` of docs/theory.md §5.1: ``n_steps + corrected * corrector_steps == num_steps``."""
    if corrector_steps == 0:
        return num_steps, 0
    corrected = (num_steps - 1) // (1 + corrector_steps)
    return num_steps - corrected * corrector_steps, corrected


def _lowest_log_margin(cond, current, z_BL):
    # the best other state from the top two of each row: one read of [B, L, V], no copy with z masked out
    top_BL2, at_BL2 = cond.topk(2, dim=-1)
    best_other = torch.where(at_BL2[..., 0] == z_BL, top_BL2[..., 1], top_BL2[..., 0])
    return -(current - best_other.to(torch.float64))


SELECTION_RULES = {
    "lowest_log_margin": _lowest_log_margin,
    "lowest_current_prob": lambda cond, current, z_BL: -current,
    "lowest_maxprob": lambda cond, current, z_BL: -cond.amax(-1).to(torch.float64),
    # random: Gumbel-top-k of zeros = uniform without replacement
    "random": lambda cond, current, z_BL: torch.zeros_like(current),
}
"""Site-selection rule name -> ``score(cond [B, L, V], current float64 [B, L], z_BL) -> float64 [B, L]``.
The rules select entries of ``cond`` (max, top two) before converting them to float64, so the scores
equal those of a float64 copy of ``cond`` without making one."""


def selection_score(cond_BLV, z_BL, rule, generator=None) -> torch.Tensor:
    """Per-site score (higher = more likely to be resampled), docs/theory.md §5.5 -> float64 ``[B, L]``.

    ``rule``: a name of ``SELECTION_RULES`` or one of its functions (resolved once by the sampler)."""
    score = SELECTION_RULES[rule] if isinstance(rule, str) else rule
    return score(cond_BLV, cond_BLV.gather(-1, z_BL[..., None]).squeeze(-1).to(torch.float64), z_BL)


@SAMPLER.register("pc_gibbs")
class PCGibbsSampler(Sampler):
    """Predictor (the step of the sampler named by ``predictor``: ``ancestral``, ``reaudm`` or
    ``max_coupling``) + informed Gibbs corrector at time s on the process's exact noisy conditional
    (``process.gibbs_conditional``, see module docstring)."""

    @dataclass(kw_only=True, frozen=True)
    class Config(Sampler.Config):
        predictor: Literal["ancestral", "reaudm", "max_coupling"] = "ancestral"
        """Predictor: the step of that sampler, with this sampler's temperature/top_p: 'ancestral' (the
        process's own step: uniform plug-in bridge, absorbing_uniform AUDM), 'reaudm' (needs
        noise_tokens: absorbing_uniform) or 'max_coupling' (needs token_states)."""
        corrector_steps: int = 2
        """Gibbs sweeps after each corrected predictor step (each one network call)."""
        k_parallel: int = 12
        """Sites resampled in parallel per sweep (1 = exact single-site Gibbs)."""
        selection: Literal["lowest_log_margin", "lowest_current_prob", "lowest_maxprob", "random"] = (
            "lowest_log_margin")
        """Site-selection rule (docs/theory.md §5.5)."""
        selection_tau: float = 1.0
        """Temperature of the Gumbel-top-k site selection (> 0; large = close to uniform)."""

    needs: ClassVar = frozenset({"gibbs_corrector"})

    @classmethod
    def required_capabilities(cls, cfg: Config) -> frozenset[str]:
        """The corrector's needs plus the predictor sampler's."""
        return super().required_capabilities(cfg) | SAMPLER.get(cfg.predictor).required_capabilities(cfg)

    def __init__(self, cfg: Config, schedule, process, parameterization, *, time_conditioning: bool = False) -> None:
        predictor_cls = SAMPLER.get(cfg.predictor)
        missing = set(predictor_cls.required_capabilities(cfg)) - set(process.capabilities)
        if missing:
            name = getattr(type(process), "registry_name", type(process).__name__)
            ok = [p for p in PREDICTORS if SAMPLER.get(p).required_capabilities(cfg) <= process.capabilities]
            raise ValueError(f"sampler.predictor={cfg.predictor!r} does not apply to process {name!r} (it lacks "
                             f"{sorted(missing)}); use one of {ok}")
        super().__init__(cfg, schedule, process, parameterization, time_conditioning=time_conditioning)
        if cfg.corrector_steps < 0 or cfg.k_parallel < 1 or not cfg.selection_tau > 0:
            raise ValueError(f"sampler needs corrector_steps >= 0, k_parallel >= 1, selection_tau > 0; got "
                             f"{cfg.corrector_steps}, {cfg.k_parallel}, {cfg.selection_tau}")
        # the predictor is that sampler's own step, sharing this sampler's settings (temperature, top_p)
        predictor_cfg = predictor_cls.Config(**{f: getattr(cfg, f) for f in Sampler.Config.__dataclass_fields__})
        self._predictor = predictor_cls(predictor_cfg, schedule, process, parameterization,
                                        time_conditioning=time_conditioning)
        self._n_steps, self._corrected = nfe_split(cfg.num_steps, cfg.corrector_steps)
        self._selection = SELECTION_RULES[cfg.selection]

    def grid_steps(self) -> int:
        """``n_steps`` predictor steps (the rest of the NFE budget goes to corrector sweeps)."""
        return self._n_steps

    def step(self, run: SamplingRun, t: float, s: float) -> None:
        """The predictor's step."""
        self._predictor.step(run, t, s)

    def after_step(self, run: SamplingRun, k: int, s: float) -> None:
        """``corrector_steps`` sweeps after each of the first ``corrected`` predictor steps."""
        if k < self._corrected and s > 0.0:
            for _ in range(self.cfg.corrector_steps):
                self.corrector_sweep(run, s)
                self.record(run)

    def conditional(self, run: SamplingRun, s: float) -> tuple[torch.Tensor, torch.Tensor]:
        """One network call at s -> (log full conditional ``[B, L, V]``, eligible sites ``[B, L]``),
        from the process's ``gibbs_conditional`` fed its ``corrector_posterior``."""
        a = self.alpha_B1(s, run)
        logits = self.call_network(run, s)
        logits = logits if logits.dtype == torch.float64 else logits.float()
        a = a.to(logits.dtype)
        logp = self.posterior_logp(logits, run, a, self.process.corrector_posterior)
        cond, eligible = self.process.gibbs_conditional(logp, run.z_BL, run.noise_BL, a)
        return cond, run.free_BL & eligible

    def corrector_sweep(self, run: SamplingRun, s: float) -> None:
        """Resample ``k_parallel`` selected eligible sites from their conditionals at time ``s``."""
        cond, eligible = self.conditional(run, s)
        score = selection_score(cond, run.z_BL, self._selection)
        chosen = cat.gumbel_topk(score, self.cfg.k_parallel, self.cfg.selection_tau, run.generator, eligible)
        # draw only at the chosen sites (k per row, not L): each from its own conditional, as before
        rows, cols = chosen.nonzero(as_tuple=True)
        new = run.z_BL.clone()
        new[rows, cols] = cat.sample_categorical(cond[rows, cols].unsqueeze(0), run.generator).squeeze(0)
        run.z_BL, run.noise_BL = self.process.gibbs_update(run.z_BL, run.noise_BL, chosen, new)

