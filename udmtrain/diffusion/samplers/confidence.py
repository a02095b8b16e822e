"""Greedy confidence sampler (docs/theory.md §5.6), for every process.

Shape legend: ``B`` batch, ``L`` length, ``V`` states; ``score_BL`` float64 margins.

Each of the ``num_steps`` steps makes one network call at the grid time t, takes the model's denoiser
``D`` (tempered per ``temperature_on``; the nucleus never changes an argmax), scores every position by
the margin ``max_v log D(v) - log D(z^l)`` (>= 0) and sets the ``k = ceil(L / num_steps)`` positions
(L: free positions, i.e. not prompt/prefix)
with the LARGEST margin to ``argmax_v D``. Largest, as the reference code does (its docstring says
"lowest confidence"; docs/theory.md §10.14): the positions where the current token is least supported by the
model are fixed first. A masked (or mask-suppressed) current token has ``log D = -inf``; it is clamped
to -1e6 so masked positions rank first and, among them, by the model's top probability. No random
numbers are drawn after the prior. The AUDM noise tokens are passed explicitly (docs/theory.md §10.4, 10.12);
``n`` is kept, so a position set to a token other than its ``n`` becomes clean.
"""

from __future__ import annotations

import math

import torch

from udmtrain.diffusion.samplers.base import Sampler, SamplingRun
from udmtrain.registry import SAMPLER

_FLOOR = -1e6  # log-prob floor for the current token: finite, far below any real log-prob


def confidence_scores(den_logp_BLV: torch.Tensor, z_BL: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(margin_BL, argmax_BL)``: ``max_v log D - max(log D(z), -1e6)`` in float64 and ``argmax_v D``."""
    top = den_logp_BLV.max(dim=-1)
    current = den_logp_BLV.gather(-1, z_BL[..., None]).squeeze(-1).to(torch.float64).clamp_min(_FLOOR)
    return top.values.to(torch.float64) - current, top.indices


@SAMPLER.register("confidence")
class ConfidenceSampler(Sampler):
    """Deterministic greedy refinement: ``num_steps`` calls, ``ceil(L/num_steps)`` positions per call."""

    def step(self, run: SamplingRun, t: float, s: float) -> None:
        """Greedy update at ``t`` (``s`` unused); clamped (prefix / prompt) positions are never selected."""
        L = int(run.free_BL.sum(-1).max())  # free positions: a prompt is never chosen, so k spreads the rest
        k = min(L, math.ceil(L / self.cfg.num_steps))
        den = self.predict(run, t, "denoiser")
        score, best = confidence_scores(den, run.z_BL)
        score = score.masked_fill(~run.free_BL, float("-inf"))
        idx = torch.topk(score, k, dim=-1).indices
        chosen = torch.zeros_like(run.z_BL, dtype=torch.bool).scatter_(1, idx, True) & run.free_BL
        run.z_BL = torch.where(chosen, best, run.z_BL)
