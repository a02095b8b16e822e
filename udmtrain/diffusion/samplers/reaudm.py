"""ReAUDM sampler for processes with noise tokens (absorbing-uniform): lifted UDM bridge + exact noise resampling (docs/theory.md §4).

Shape legend: ``B`` batch, ``L`` length, ``V`` tokens; ``z_BL`` tokens, ``noise_BL`` the per-position
noise tokens ``n``; ``*_B1`` float64 ``[B, 1]``.

Step ``t -> s``: (1) ``x~ ~ p(x | z_t, n_t)`` per position; (2) ``z_s ~ q(z_s | z_t, x~)``, the exact
uniform bridge; (3) ``n_s`` from its exact conditional given ``(x~, z_s)``: ``n_s = z_s`` if
``z_s != x~`` (masked); else (clean or masked-by-coincidence) ``n_s = z_s`` w.p. ``1/(1 + (V-1) a_s)``
— the masked weight ``(1-a_s)/V`` plus the clean one ``a_s/V``, against ``a_s/V`` for each other
value — otherwise uniform on ``V \\ {z_s}``. If ``(x, z_t, n_t)`` has the AUDM law at t, then
``(x~, z_s, n_s)`` has it at s, so clean positions can be remasked ("natural remasking").
"""

from __future__ import annotations

from typing import ClassVar

import torch

from udmtrain.diffusion.samplers import categorical as cat
from udmtrain.diffusion.samplers.base import Sampler, SamplingRun
from udmtrain.registry import SAMPLER


def reaudm_step(den_probs_BLV, z_BL, noise_BL, alpha_t_B1, alpha_s_B1, generator
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """One ReAUDM step -> ``(z_s, n_s)``, both LongTensor ``[B, L]`` (docs/theory.md §4, steps 1-3)."""
    V = den_probs_BLV.shape[-1]
    x_tilde = cat.sample_from_probs(den_probs_BLV, generator)
    # the exact uniform bridge from x~ (functional.uniform_bridge of the one-hot e_{x~}) as a mixture of
    # two point masses and the uniform law: no [B, L, V] one-hot
    a_t, a_s = alpha_t_B1.to(torch.float64), alpha_s_B1.to(torch.float64)
    own = V * a_t * (x_tilde == z_BL).to(torch.float64) + a_t / a_s - a_t
    z_s = cat.sample_mixture(generator, atoms=[(x_tilde, a_s - a_t), (z_BL, own)],
                             uniform_weight=(a_s - a_t) * (1 - a_s) / (V * a_s), num_states=V)
    a_s = alpha_s_B1.to(torch.float64).expand_as(z_BL)
    keep = cat.bernoulli(1.0 / (1.0 + (V - 1) * a_s), generator)
    # uniform on V \ {z_s}: draw r in [0, V-2] and skip z_s
    r = torch.randint(0, max(V - 1, 1), z_BL.shape, generator=generator, device=generator.device).to(z_BL.device)
    other = r + (r >= z_s).long()
    n_s = torch.where((z_s != x_tilde) | keep, z_s, other)
    return z_s, n_s


@SAMPLER.register("reaudm")
class ReAUDMSampler(Sampler):
    """ReAUDM: the AUDM-trained posterior driven through the lifted UDM bridge (docs/theory.md §4).

    ``num_steps`` network calls; the noise tokens are always passed to the network explicitly
    (docs/theory.md §10.12) and returned in ``SampleOutput.noise_BL``."""

    needs: ClassVar = frozenset({"noise_tokens"})

    def step(self, run: SamplingRun, t: float, s: float) -> None:
        """One ReAUDM step with the model's posterior ``p(x | z, n)``."""
        a_t, a_s = self.alpha_B1(t, run), self.alpha_B1(s, run)
        den = self.predict(run, t, "denoiser", alpha_B1=a_t)
        run.z_BL, run.noise_BL = reaudm_step(cat.probs_from_logp(den), run.z_BL, run.noise_BL, a_t, a_s, run.generator)
