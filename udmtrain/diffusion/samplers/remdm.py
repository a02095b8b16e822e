"""ReMDM remasking sampler for the masked process (SPEC 5.4, Wang et al. 2025 "ReMDM").

Shape legend: ``B`` batch, ``L`` length, ``V`` states (V tokens + mask), ``*_B1`` float64 ``[B, 1]``.

Per step ``t -> s`` with a remasking probability ``sigma_t`` (``<= sigma_max = min(1, (1-a_s)/a_t)``):
draw ``x~ ~ x̂`` per position; a masked position unmasks to ``x~`` w.p. ``1 - (1-a_s-sigma a_t)/(1-a_t)``,
a clean one is remasked w.p. ``sigma``. For any fixed x this kernel maps ``q_t(.|x)`` to ``q_s(.|x)``
(``P(z_s = m) = (1-a_t)(1-a_s-sigma a_t)/(1-a_t) + a_t sigma = 1-a_s``), so with an exact denoiser every
schedule is exact up to the factorised per-position draw, which vanishes as the steps grow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from udmtrain.diffusion.samplers import categorical as cat
from udmtrain.diffusion.samplers.base import Sampler, SamplingRun
from udmtrain.registry import SAMPLER


def remdm_step(den_probs_BLV, z_BL, alpha_t_B1, alpha_s_B1, sigma_B1, mask_id: int, generator) -> torch.Tensor:
    """One ReMDM step (SPEC 5.4) -> ``z_s`` ``[B, L]``; ``sigma_B1`` must be ``<= sigma_max``."""
    x_tilde = cat.sample_from_probs(cat.drop_state(den_probs_BLV, mask_id), generator)
    x_tilde = torch.where(z_BL == mask_id, x_tilde, z_BL)  # carry-over whatever the net says
    a_t, a_s, sig = (v.to(torch.float64) for v in (alpha_t_B1, alpha_s_B1, sigma_B1))
    p_stay_BL = ((1 - a_s - sig * a_t) / (1 - a_t)).clamp(0.0, 1.0).expand_as(z_BL)
    masked = z_BL == mask_id
    unmask = masked & ~cat.bernoulli(p_stay_BL, generator)
    remask = ~masked & cat.bernoulli(sig.expand_as(z_BL), generator)
    z_s = torch.where(unmask, x_tilde, z_BL)
    return torch.where(remask, torch.full_like(z_BL, mask_id), z_s)


@SAMPLER.register("remdm")
class ReMDMSampler(Sampler):
    """ReMDM for the masked process with the sigma schedules of SPEC 5.4.

    ``zero`` (= MDLM), ``constant`` (``eta``), ``cap`` (``min(eta_cap, sigma_max)``), ``rescale``
    (``eta_rescale * sigma_max``), ``loop`` (time-warped alpha: linear 0 -> ``alpha_on`` for
    ``t > t_on``, plateau ``alpha_on`` with ``sigma = loop_eta`` on ``t_off < t <= t_on``, linear
    ``alpha_on`` -> 1 for ``t <= t_off``; the network gets ``sigma = -log alpha_warped``). ``t_switch``:
    no remasking while ``t > t_switch``. Always ``sigma_t = min(sigma_base, sigma_max)``.
    """

    @dataclass(kw_only=True, frozen=True)
    class Config(Sampler.Config):
        sigma_schedule: Literal["zero", "constant", "cap", "rescale", "loop"] = "cap"
        """Remasking schedule sigma_t (SPEC 5.4)."""
        eta: float = 0.02
        """'constant': sigma_base = eta."""
        eta_cap: float = 0.04
        """'cap': sigma_base = eta_cap."""
        eta_rescale: float = 0.01
        """'rescale': sigma_base = eta_rescale * sigma_max."""
        t_on: float = 0.55
        """'loop': start of the plateau (t decreases from 1)."""
        t_off: float = 0.05
        """'loop': end of the plateau."""
        alpha_on: float = 0.9
        """'loop': alpha on the plateau."""
        loop_eta: float = 0.02
        """'loop': sigma_base on the plateau (0 elsewhere)."""
        t_switch: float = 1.0
        """No remasking while t > t_switch (1 = remask at every step)."""

    requires: ClassVar = {"process": frozenset({"masked"})}

    def __init__(self, cfg: Config, schedule, process, parameterization) -> None:
        super().__init__(cfg, schedule, process, parameterization)
        for key in ("eta", "eta_cap", "eta_rescale", "loop_eta"):
            if not 0.0 <= getattr(cfg, key) <= 1.0:
                raise ValueError(f"sampler.{key} must be in [0, 1], got {getattr(cfg, key)}")
        if cfg.sigma_schedule == "loop" and not (0.0 < cfg.t_off < cfg.t_on < 1.0 and 0.0 < cfg.alpha_on < 1.0):
            raise ValueError(f"sampler.sigma_schedule='loop' needs 0 < t_off < t_on < 1 and 0 < alpha_on < 1, got "
                             f"t_off={cfg.t_off}, t_on={cfg.t_on}, alpha_on={cfg.alpha_on}")

    def warped_alpha(self, t: float, run: SamplingRun) -> torch.Tensor:
        """alpha_t as float64 ``[B, 1]``: the schedule's, or the 'loop' warp."""
        c = self.cfg
        if c.sigma_schedule != "loop":
            return self.alpha_B1(t, run)
        if t > c.t_on:
            a = c.alpha_on * (1.0 - t) / (1.0 - c.t_on)
        elif t > c.t_off:
            a = c.alpha_on
        else:
            a = c.alpha_on + (1.0 - c.alpha_on) * (c.t_off - t) / c.t_off
        return torch.full((run.z_BL.shape[0], 1), a, dtype=torch.float64, device=run.z_BL.device)

    def sigma_B1(self, t: float, alpha_t_B1: torch.Tensor, alpha_s_B1: torch.Tensor) -> torch.Tensor:
        """Remasking probability ``min(sigma_base, sigma_max)`` for the step starting at ``t``."""
        c = self.cfg
        sigma_max = torch.where(alpha_t_B1 > 0, (1 - alpha_s_B1) / alpha_t_B1.clamp_min(1e-300),
                                torch.ones_like(alpha_t_B1)).clamp(max=1.0)
        if c.sigma_schedule == "zero" or t > c.t_switch:
            base = torch.zeros_like(sigma_max)
        elif c.sigma_schedule == "constant":
            base = torch.full_like(sigma_max, c.eta)
        elif c.sigma_schedule == "cap":
            base = torch.full_like(sigma_max, c.eta_cap)
        elif c.sigma_schedule == "rescale":
            base = c.eta_rescale * sigma_max
        else:  # loop: remask only on the plateau
            base = torch.full_like(sigma_max, c.loop_eta if c.t_off < t <= c.t_on else 0.0)
        return torch.minimum(base, sigma_max)

    def generate(self, run: SamplingRun) -> None:
        """``num_steps`` ReMDM steps from t = 1 to 0 (one network call each)."""
        times = self.time_grid(self.cfg.num_steps)
        for t, s in zip(times[:-1], times[1:]):
            a_t, a_s = self.warped_alpha(t, run), self.warped_alpha(s, run)
            # network time input of the (possibly warped) alpha; alpha = 0 at t = 1 under 'loop'
            sigma_in = -torch.log(a_t.clamp_min(math.exp(-30.0))).reshape(-1)
            den = self.predict(run, t, "denoiser", alpha_B1=a_t, sigma_B=sigma_in)
            sig = self.sigma_B1(t, a_t, a_s)
            run.z_BL = remdm_step(den.exp(), run.z_BL, a_t, a_s, sig, self.mask_id, run.generator)
            self.record(run)
