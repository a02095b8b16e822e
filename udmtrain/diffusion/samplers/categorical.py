"""Categorical draws, temperature and nucleus helpers shared by every sampler.

Shape legend: ``B`` batch, ``L`` sequence length, ``V`` states per position (``num_states``), ``K``
selected sites. All random numbers come from an explicit ``torch.Generator`` (SPEC 10.3: the global
RNG makes ``generator_seed`` meaningless), drawn on the generator's device and moved where needed.

Categorical sampling is float64 Gumbel-argmax (SPEC 0 "Precision", Appendix A): with float32 uniforms
the Gumbel tail is truncated at ``-log(-log(1 - 2^-24)) ~ 16.6``, which lowers the effective
temperature of a 50k-way draw; float64 pushes the cut-off to ``~36.7``.
"""

from __future__ import annotations

import torch

_TINY64 = torch.finfo(torch.float64).tiny


def uniform01(shape, generator: torch.Generator, device: torch.device | str | None = None) -> torch.Tensor:
    """float64 uniforms in the open interval ``(0, 1)`` of ``shape``, drawn with ``generator``.

    ``torch.rand`` returns ``[0, 1)``; the lower end is clamped to the smallest normal double so
    ``log`` never sees 0 (the upper end ``1 - 2^-53`` keeps ``-log u > 0``).
    """
    u = torch.rand(shape, generator=generator, device=generator.device, dtype=torch.float64)
    u = u.clamp_min_(_TINY64)
    return u if device is None else u.to(device)


def gumbel(shape, generator: torch.Generator, device=None) -> torch.Tensor:
    """Standard Gumbel noise ``g = -log(-log u)``, float64, of ``shape``."""
    return -torch.log(-torch.log(uniform01(shape, generator, device)))


def sample_categorical(logp_BLV: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Draw ``argmax_v (log p(v) + g_v)`` per row -> LongTensor ``[B, L]``.

    ``logp_BLV`` may be un-normalised log-weights (Gumbel-argmax is invariant to a per-row shift) and
    may hold ``-inf`` for impossible states; it is promoted to float64 before adding the noise.
    """
    g = gumbel(logp_BLV.shape, generator, logp_BLV.device)
    return torch.argmax(logp_BLV.to(torch.float64) + g, dim=-1)


def sample_from_probs(probs_BLV: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Categorical draw from (possibly un-normalised, non-negative) weights -> ``[B, L]``.

    Same Gumbel-argmax as :func:`sample_categorical` on ``log(probs)`` (``log 0 = -inf``).
    """
    return sample_categorical(torch.log(probs_BLV.to(torch.float64)), generator)


def bernoulli(prob: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Bool tensor shaped like ``prob``: True with probability ``prob`` (float64 uniforms)."""
    return uniform01(prob.shape, generator, prob.device) < prob.to(torch.float64)


def gumbel_topk(score_BL: torch.Tensor, k: int, tau: float, generator: torch.Generator,
                allowed_BL: torch.Tensor | None = None) -> torch.Tensor:
    """``k`` distinct positions per row, drawn without replacement with weights ``∝ exp(score/tau)``.

    Gumbel-top-k: ``topk(score/tau + g)`` is an exact draw of a size-k ordered sample without
    replacement from ``softmax(score/tau)`` (Vieira 2014, Kool et al. 2019). Positions with
    ``allowed_BL == False`` get ``-inf`` and are never chosen while allowed ones remain; the caller
    limits ``k`` to the number of allowed positions. Returns a bool mask ``[B, L]`` with ``k`` True
    per row (fewer where a row has fewer allowed positions).
    """
    B, L = score_BL.shape
    k = min(int(k), L)
    keys_BL = score_BL.to(torch.float64) / tau + gumbel((B, L), generator, score_BL.device)
    if allowed_BL is not None:
        keys_BL = keys_BL.masked_fill(~allowed_BL, float("-inf"))
    idx_BK = torch.topk(keys_BL, k, dim=-1).indices
    chosen_BL = torch.zeros(B, L, dtype=torch.bool, device=score_BL.device)
    chosen_BL.scatter_(1, idx_BK, True)
    if allowed_BL is not None:
        chosen_BL &= allowed_BL
    return chosen_BL


def temper(logp_BLV: torch.Tensor, temperature: float) -> torch.Tensor:
    """Tempered, renormalised log-probs ``log softmax(log p / T)`` (SPEC 5.2), i.e. ``p^{1/T} / Z``.

    ``T = 1`` returns the input unchanged (no renormalisation round-off).
    """
    if temperature == 1.0:
        return logp_BLV
    return torch.log_softmax(logp_BLV / temperature, dim=-1)


def top_p_filter(logp_BLV: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus truncation (SPEC 5.3) of normalised log-probs, renormalised -> ``[B, L, V]``.

    Per row: sort descending, keep the smallest prefix whose cumulative mass is ``>= top_p`` (the
    top-1 is always kept), set the rest to ``-inf`` and renormalise. ``top_p >= 1`` is the identity.
    A token is kept iff the mass strictly before it (in sorted order) is ``< top_p``.
    """
    if top_p >= 1.0:
        return logp_BLV
    sorted_logp, order = torch.sort(logp_BLV, dim=-1, descending=True)
    probs = sorted_logp.exp()
    mass_before = torch.cumsum(probs, dim=-1) - probs
    drop_sorted = mass_before >= top_p
    drop_sorted[..., 0] = False  # always keep the top-1, even for top_p <= p_max rounding
    drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
    return torch.log_softmax(logp_BLV.masked_fill(drop, float("-inf")), dim=-1)
