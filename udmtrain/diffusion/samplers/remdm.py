"""ReMDM remasking sampler for the masked process (docs/theory.md §5.4, Wang et al. 2025 "ReMDM").

Shape legend: ``B`` batch, ``L`` length, ``V`` states (V tokens + mask), ``*_B1`` float64 ``[B, 1]``.

Per step ``t -> s`` with a remasking probability ``r_t`` (the ReMDM paper's sigma_t, hence the recipe
key ``sigma_schedule``; here ``remask`` everywhere, because ``sigma`` in udmtrain is the network's time
input ``-log alpha``), ``r_t <= r_max = min(1, (1-a_s)/a_t)``:
draw ``x~ ~ x̂`` per position; a masked position unmasks to ``x~`` w.p. ``1 - (1-a_s-r a_t)/(1-a_t)``,
a clean one is remasked w.p. ``r``. For any fixed x this kernel maps ``q_t(.|x)`` to ``q_s(.|x)``
(``P(z_s = m) = (1-a_t)(1-a_s-r a_t)/(1-a_t) + a_t r = 1-a_s``), so with an exact denoiser every
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


def remdm_step(den_probs_BLV, z_BL, alpha_t_B1, alpha_s_B1, remask_B1, mask_id: int, generator) -> torch.Tensor:
    """One ReMDM step (docs/theory.md §5.4) -> ``z_s`` ``[B, L]``; the remasking probability ``remask_B1`` must be
    ``<= r_max``."""
    x_tilde = cat.sample_from_probs(cat.drop_state(den_probs_BLV, mask_id), generator)
    x_tilde = torch.where(z_BL == mask_id, x_tilde, z_BL)  # carry-over whatever the net says
    a_t, a_s, sig = (v.to(torch.float64) for v in (alpha_t_B1, alpha_s_B1, remask_B1))
    p_stay_BL = ((1 - a_s - sig * a_t) / (1 - a_t)).clamp(0.0, 1.0).expand_as(z_BL)
    masked = z_BL == mask_id
    unmask = masked & ~cat.bernoulli(p_stay_BL, generator)
    remask = ~masked & cat.bernoulli(sig.expand_as(z_BL), generator)
    z_s = torch.where(unmask, x_tilde, z_BL)
    return torch.where(remask, torch.full_like(z_BL, mask_id), z_s)


@SAMPLER.register("remdm")
class ReMDMSampler(Sampler):
    """ReMDM with the remasking schedules of docs/theory.md §5.4 (any process with a 'mask_state').

    ``zero`` (= MDLM), ``constant`` (``eta``), ``cap`` (``min(eta_cap, r_max)``), ``rescale``
    (``eta_rescale * r_max``), ``loop`` (time-warped alpha: linear 0 -> ``alpha_on`` for
    ``t > t_on``, plateau ``alpha_on`` with ``r = loop_eta`` on ``t_off < t <= t_on``, linear
    ``alpha_on`` -> 1 for ``t <= t_off``; the network's time input is ``-log alpha_warped``).
    ``t_switch``: no remasking while ``t > t_switch``. Always ``r_t = min(r_base, r_max)``.
    """

    @dataclass(kw_only=True, frozen=True)
    class Config(Sampler.Config):
        sigma_schedule: Literal["zero", "constant", "cap", "rescale", "loop"] = "cap"
        """Schedule of the remasking probability (the paper's sigma_t, docs/theory.md §5.4)."""
        eta: float = 0.02
        """'constant': r_base = eta."""
        eta_cap: float = 0.04
        """'cap': r_base = eta_cap."""
        eta_rescale: float = 0.01
        """'rescale': r_base = eta_rescale * r_max."""
        t_on: float = 0.55
        """'loop': start of the plateau (t decreases from 1)."""
        t_off: float = 0.05
        """'loop': end of the plateau."""
        alpha_on: float = 0.9
        """'loop': alpha on the plateau."""
        loop_eta: float = 0.02
        """'loop': r_base on the plateau (0 elsewhere)."""
        t_switch: float = 1.0
        """No remasking while t > t_switch (1 = remask at every step)."""

    needs: ClassVar = frozenset({"mask_state"})

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        cfg = self.cfg
        for key in ("eta", "eta_cap", "eta_rescale", "loop_eta"):
            if not 0.0 <= getattr(cfg, key) <= 1.0:
                raise ValueError(f"sampler.{key} must be in [0, 1], got {getattr(cfg, key)}")
        if cfg.sigma_schedule == "loop" and not (0.0 < cfg.t_off < cfg.t_on < 1.0 and 0.0 < cfg.alpha_on < 1.0):
            raise ValueError(f"sampler.sigma_schedule='loop' needs 0 < t_off < t_on < 1 and 0 < alpha_on < 1, got "
                             f"t_off={cfg.t_off}, t_on={cfg.t_on}, alpha_on={cfg.alpha_on}")
        # the schedule's name is resolved once: r_base(t, r_max) per schedule
        self._remask_base = {
            "zero": lambda t, r_max: torch.zeros_like(r_max),
            "constant": lambda t, r_max: torch.full_like(r_max, cfg.eta),
            "cap": lambda t, r_max: torch.full_like(r_max, cfg.eta_cap),
            "rescale": lambda t, r_max: cfg.eta_rescale * r_max,
            # loop: remask only on the plateau
            "loop": lambda t, r_max: torch.full_like(r_max, cfg.loop_eta if cfg.t_off < t <= cfg.t_on else 0.0),
        }[cfg.sigma_schedule]
        self._warped = cfg.sigma_schedule == "loop"

    def warped_alpha(self, t: float, run: SamplingRun) -> torch.Tensor:
        """alpha_t as float64 ``[B, 1]``: the schedule's, or the 'loop' warp."""
        c = self.cfg
        if not self._warped:
            return self.alpha_B1(t, run)
        if t > c.t_on:
            a = c.alpha_on * (1.0 - t) / (1.0 - c.t_on)
        elif t > c.t_off:
            a = c.alpha_on
        else:
            a = c.alpha_on + (1.0 - c.alpha_on) * (c.t_off - t) / c.t_off
        return torch.full((run.z_BL.shape[0], 1), a, dtype=torch.float64, device=run.z_BL.device)

    def remask_B1(self, t: float, alpha_t_B1: torch.Tensor, alpha_s_B1: torch.Tensor) -> torch.Tensor:
        """Remasking probability ``min(r_base, r_max)`` for the step starting at ``t``."""
        r_max = torch.where(alpha_t_B1 > 0, (1 - alpha_s_B1) / alpha_t_B1.clamp_min(1e-300),
                            torch.ones_like(alpha_t_B1)).clamp(max=1.0)
        if t > self.cfg.t_switch:
            return torch.zeros_like(r_max)
        return torch.minimum(self._remask_base(t, r_max), r_max)

    def step(self, run: SamplingRun, t: float, s: float) -> None:
        """One ReMDM step (one network call)."""
        a_t, a_s = self.warped_alpha(t, run), self.warped_alpha(s, run)
        # network time input of the (possibly warped) alpha; alpha = 0 at t = 1 under 'loop'
        time_input_B = -torch.log(a_t.clamp_min(math.exp(-30.0))).reshape(-1)
        den = self.predict(run, t, "denoiser", alpha_B1=a_t, sigma_B=time_input_B)
        remask = self.remask_B1(t, a_t, a_s)
        run.z_BL = remdm_step(cat.probs_from_logp(den), run.z_BL, a_t, a_s, remask, self.mask_id, run.generator)
