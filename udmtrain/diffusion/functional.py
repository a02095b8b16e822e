"""Discrete-diffusion math as pure, stateless torch functions (docs/theory.md §0).

Shape legend: ``B`` batch, ``L`` positions, ``V`` token-space size of the process (the tokenizer's V
for the uniform / absorbing-uniform processes, V+1 for the masked one). ``xt``, ``x0``, ``noise``:
LongTensor ``[B, L]``; logits / log-probs ``[B, L, V]``; ``alpha``, ``dalpha``: float ``[B, 1]``
(a Python float or 0-d tensor also works); ``t``: float ``[B]`` (or any shape).

Precision: every function works in the float dtype of its float input (float32 in training, float64
in tests); bf16/fp16 inputs are upcast to float32 first (docs/theory.md §10.6). ``log1p``/``expm1`` are used
wherever ``alpha -> 1`` or ``alpha -> 0`` would cancel. Index-dependent edits (``+ delta e_i``) use
``scatter``/``gather``, never a ``[B, L, V]`` one-hot.

Uniform-process constants (docs/theory.md §1): ``c = V alpha / (1 - alpha)``, ``delta = log1p(c)``,
``lambda = -alpha'/alpha``, ``r = -alpha'/(1 - alpha)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

#: Floor on probabilities inside the max-coupling / AUDM NELBO logs (docs/theory.md §3.3): ``log(1e-12)``.
LOG_PROB_FLOOR = math.log(1e-12)


# ----------------------------------------------------------------------------------- helpers
def upcast(x: Tensor) -> Tensor:
    """Upcast half-precision floats to float32; keep float32/float64 as they are."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _like(value, ref: Tensor) -> Tensor:
    """``value`` (float, tensor) as a tensor of ``ref``'s float dtype and device."""
    return torch.as_tensor(value, device=ref.device).to(ref.dtype)


def _col(alpha: Tensor) -> Tensor:
    """``[B, 1]`` (or scalar) -> broadcastable over ``[B, L, V]``: ``[B, 1, 1]``."""
    return alpha.unsqueeze(-1) if alpha.dim() >= 1 else alpha


def gather_tokens(x_BLV: Tensor, idx_BL: Tensor) -> Tensor:
    """``x[b, l, idx[b, l]]`` -> ``[B, L]``."""
    return x_BLV.gather(-1, idx_BL.unsqueeze(-1)).squeeze(-1)


def _add_at(x_BLV: Tensor, idx_BL: Tensor, value) -> Tensor:
    """Out-of-place ``x + value * e_idx`` along the last axis (``value`` broadcast to ``[B, L]``)."""
    val_BL1 = torch.broadcast_to(_like(value, x_BLV), idx_BL.shape).unsqueeze(-1)
    return x_BLV.scatter_add(-1, idx_BL.unsqueeze(-1), val_BL1)


def _set_at(x_BLV: Tensor, idx_BL: Tensor, value) -> Tensor:
    """Out-of-place ``x`` with entry ``idx`` set to ``value`` (broadcast to ``[B, L]``)."""
    val_BL1 = torch.broadcast_to(_like(value, x_BLV), idx_BL.shape).unsqueeze(-1)
    return x_BLV.scatter(-1, idx_BL.unsqueeze(-1), val_BL1)


_float, _gather = upcast, gather_tokens


# ---------------------------------------------------------------------------------- schedules
def loglinear_alpha(t: Tensor, eps: float = 1e-3) -> tuple[Tensor, Tensor]:
    """Log-linear schedule (docs/theory.md §1): ``alpha_t = 1 - (1 - eps) t``, ``dalpha_t = -(1 - eps)``.

    Named after ``sigma_t = -log alpha_t = -log(1 - (1 - eps) t)``. ``alpha_0 = 1``, ``alpha_1 = eps``.
    """
    t = _float(torch.as_tensor(t))
    return 1 - (1 - eps) * t, torch.full_like(t, -(1 - eps))


def cosine_alpha(t: Tensor, eps: float = 1e-3) -> tuple[Tensor, Tensor]:
    """Cosine schedule ``alpha_t = eps + (1 - eps) cos(pi t / 2)``, ``dalpha = -(1-eps)(pi/2) sin(pi t/2)``.

    ``alpha_0 = 1``, ``alpha_1 = eps`` like the log-linear schedule.
    """
    t = _float(torch.as_tensor(t))
    half_pi = math.pi / 2
    return eps + (1 - eps) * torch.cos(half_pi * t), -(1 - eps) * half_pi * torch.sin(half_pi * t)


def sigma_from_alpha(alpha: Tensor) -> Tensor:
    """Network time input ``sigma = -log alpha`` (docs/theory.md §1)."""
    return -torch.log(_float(alpha))


def delta_t(alpha: Tensor, V: int) -> Tensor:
    """Own-token log-evidence ``delta = log1p(V alpha / (1 - alpha))`` (docs/theory.md §2; shape of ``alpha``)."""
    alpha = _float(torch.as_tensor(alpha))
    return torch.log1p(V * alpha / (1 - alpha))


def log_c_t(alpha: Tensor, V: int) -> Tensor:
    """``log c = log(V alpha / (1 - alpha))`` computed as ``log V + log alpha - log1p(-alpha)``."""
    alpha = _float(torch.as_tensor(alpha))
    return math.log(V) + torch.log(alpha) - torch.log1p(-alpha)


# -------------------------------------------------------------------- LOO <-> denoiser (docs/theory.md §2)
def loo_to_denoiser(loo_logits: Tensor, xt: Tensor, alpha: Tensor) -> Tensor:
    """Denoiser log-probs from LOO logits: ``log D = log_softmax(loo_logits + delta e_{xt})`` [B,L,V].

    Bayes: ``D(v) ∝ Lo(v) q_t(xt | v) ∝ Lo(v) (1 + c 1[v = xt])``.
    """
    logits = _float(loo_logits)
    delta_B11 = _col(delta_t(_like(alpha, logits), logits.shape[-1]))
    return torch.log_softmax(_add_at(logits, xt, delta_B11.squeeze(-1)), dim=-1)


def denoiser_to_loo(den_logits: Tensor, xt: Tensor, alpha: Tensor) -> Tensor:
    """LOO log-probs from denoiser logits: ``log Lo = log_softmax(den_logits - delta e_{xt})`` [B,L,V]."""
    logits = _float(den_logits)
    delta_B11 = _col(delta_t(_like(alpha, logits), logits.shape[-1]))
    return torch.log_softmax(_add_at(logits, xt, -delta_B11.squeeze(-1)), dim=-1)


# --------------------------------------------------------------------------- scores (docs/theory.md §2)
def log_score_from_loo(loo_logp: Tensor, xt: Tensor, alpha: Tensor) -> Tensor:
    """``log s(y) = log(1 + c Lo(y)) - log(1 + c Lo(xt))`` [B,L,V] (exactly 0 at ``y = xt``)."""
    lp = _float(loo_logp)
    log_c = _col(log_c_t(_like(alpha, lp), lp.shape[-1]))
    log1p_cLo = torch.logaddexp(torch.zeros((), dtype=lp.dtype, device=lp.device), log_c + lp)
    return log1p_cLo - _gather(log1p_cLo, xt).unsqueeze(-1)


def score_from_loo(loo_logp: Tensor, xt: Tensor, alpha: Tensor) -> Tensor:
    """Concrete score ``s(y) = q_t(z^l <- y) / q_t(z) = (1 + c Lo(y)) / (1 + c Lo(xt))`` [B,L,V]; ``s(xt) = 1``."""
    return torch.exp(log_score_from_loo(loo_logp, xt, alpha))


def score_from_denoiser(den_logp: Tensor, xt: Tensor, alpha: Tensor) -> Tensor:
    """Concrete score from the denoiser: ``s(y) = 1 + c D(y) - c/(1+c) D(xt)`` for ``y != xt``, ``s(xt) = 1``.

    Evaluated as ``c D(y) + (1 + c (1 - D(xt))) / (1 + c)`` (two non-negative terms, no cancellation;
    ``1 - D(xt) = -expm1(log D(xt))``).
    """
    lp = _float(den_logp)
    c_B11 = _col(torch.exp(log_c_t(_like(alpha, lp), lp.shape[-1])))
    one_minus_Di_BL1 = -torch.expm1(_gather(lp, xt)).unsqueeze(-1)
    s = c_B11 * torch.exp(lp) + (1 + c_B11 * one_minus_Di_BL1) / (1 + c_B11)
    return _set_at(s, xt, 1.0)


def loo_from_score(s: Tensor, xt: Tensor, alpha: Tensor) -> Tensor:
    """Inverse of ``score_from_loo``: ``Lo(y) = ((V + c) s(y) / S - 1) / c`` with ``S = sum_y s(y)``; log-probs."""
    s = _float(s)
    V = s.shape[-1]
    c_B11 = _col(torch.exp(log_c_t(_like(alpha, s), V)))
    lo = ((V + c_B11) * s / s.sum(-1, keepdim=True) - 1) / c_B11
    return torch.log(lo.clamp_min(0))


def denoiser_from_score(s: Tensor, xt: Tensor, alpha: Tensor) -> Tensor:
    """Inverse of ``score_from_denoiser`` (log-probs):
    ``D(xt) = (1+c)(V+c-S) / (c (V+c))``, ``D(y != xt) = (s(y) - 1 + D(xt) c/(1+c)) / c``."""
    s = _float(s)
    V = s.shape[-1]
    c_B11 = _col(torch.exp(log_c_t(_like(alpha, s), V)))
    S_BL1 = s.sum(-1, keepdim=True)
    Di_BL1 = (1 + c_B11) * (V + c_B11 - S_BL1) / (c_B11 * (V + c_B11))
    d = (s - 1 + Di_BL1 * c_B11 / (1 + c_B11)) / c_B11
    d = _set_at(d, xt, Di_BL1.squeeze(-1))
    return torch.log(d.clamp_min(0))


# ---------------------------------------------------------------- bridges and conditionals
def uniform_bridge(x0_probs: Tensor, xt: Tensor, alpha_t: Tensor, alpha_s: Tensor) -> Tensor:
    """Uniform-process bridge ``p(z_s = y | z_t = xt, x ~ x0_probs)``, normalised probs [B,L,V] (docs/theory.md §1.2).

    ``N_y = V a_t x(z) 1[y=z] + (a_t/a_s - a_t) 1[y=z] + (a_s - a_t) x(y) + (a_s - a_t)(1 - a_s)/(V a_s)``,
    divided by ``sum_y N_y`` (``= V a_t x(z) + 1 - a_t`` for a normalised x). One-hot ``x0_probs`` gives
    the exact bridge; the LOO gives the plug-in bridge, which equals the denoiser-mixture of exact bridges.
    """
    x = _float(x0_probs)
    V = x.shape[-1]
    at, as_ = _col(_like(alpha_t, x)), _col(_like(alpha_s, x))
    n = (as_ - at) * x + (as_ - at) * (1 - as_) / (V * as_)
    own_BL = (V * at * _gather(x, xt).unsqueeze(-1) + at / as_ - at).squeeze(-1)
    n = _add_at(n, xt, own_BL)
    return n / n.sum(-1, keepdim=True)


def noisy_conditional(loo_logp: Tensor, alpha: Tensor) -> Tensor:
    """``log p_t(z^l = v | z^{-l}) = log(alpha Lo(v) + (1 - alpha)/V)`` [B,L,V] (docs/theory.md §2, Gibbs corrector)."""
    lp = _float(loo_logp)
    a = _col(_like(alpha, lp))
    return torch.logaddexp(torch.log(a) + lp, torch.log1p(-a) - math.log(lp.shape[-1]))


# ------------------------------------------------------------------------- NELBOs (docs/theory.md §3)
def udlm_nelbo(loo_logp: Tensor, x0: Tensor, xt: Tensor, alpha: Tensor, dalpha: Tensor) -> Tensor:
    """UDLM plug-in NELBO per token [B,L] (docs/theory.md §3.1), O(V) closed form; minimiser ``x̂ = Lo``.

    With ``x̄θ = V alpha x̂ + (1 - alpha) 1``, ``i = xt``, ``kappa = (1-alpha)/(V alpha + 1 - alpha)`` and
    ``g(u) = e^u - 1 - u >= 0`` this is the CTMC path KL
    ``(lambda/V) sum_{y != i} s_x(y) g(log ŝ(y) - log s_x(y))`` with plug-in score ``ŝ(y) = x̄θ_y/x̄θ_i``:
    * ``x = i``:  ``s_x(y) = kappa`` for all ``y != i``;
    * ``x != i``: ``s_x(y) = 1`` except ``s_x(x) = 1/kappa``.
    The bulk sums use one ``sum_j log x̄θ_j`` and ``sum_j x̄θ_j = V`` (``loo_logp`` must be normalised);
    the ``1/kappa``-weighted term is kept as ``g(u)`` (``expm1(u) - u``), which avoids the
    ``O(V alpha/(1-alpha))`` cancellation of the raw formula. Algebraically identical to docs/theory.md §3.1's
    ``(alpha'/(V alpha)) (term1 - term2)``.
    """
    lp = _float(loo_logp)
    V = lp.shape[-1]
    a = _like(alpha, lp)
    lam = -_like(dalpha, lp) / a
    log_1ma = torch.log1p(-a)
    log_xbar = torch.logaddexp(_col(torch.log(V * a)) + lp, _col(log_1ma))  # [B,L,V]
    sum_log = log_xbar.sum(-1)
    li, lx = _gather(log_xbar, xt), _gather(log_xbar, x0)
    lpi, lpx = _gather(lp, xt), _gather(lp, x0)
    xbi = torch.exp(li)
    log_kappa = log_1ma - torch.log1p(a * (V - 1))
    kappa = torch.exp(log_kappa)
    # x = i: kappa * sum_{y != i} g(log x̄θ_y - li - log kappa); V - x̄θ_i = V a (1 - x̂_i) + (V-1)(1-a)
    rest_i = V * a * -torch.expm1(lpi) + (V - 1) * (1 - a)
    same = rest_i / xbi - kappa * (V - 1) - kappa * ((sum_log - li) - (V - 1) * (li + log_kappa))
    # x != i: sum_{y not in {i,x}} g(log x̄θ_y - li) + g(lx - li + log kappa) / kappa
    rest_ix = V * a * (1 - torch.exp(lpi) - torch.exp(lpx)) + (V - 2) * (1 - a)
    u_x = lx - li + log_kappa
    diff = (rest_ix / xbi - (V - 2) - (sum_log - lx - (V - 1) * li)
            + (torch.expm1(u_x) - u_x) / kappa)
    return lam / V * torch.where(x0 == xt, same, diff)


def max_coupling_nelbo(den_logp: Tensor, x0: Tensor, xt: Tensor, alpha: Tensor, dalpha: Tensor) -> Tensor:
    """Max-coupling NELBO per token [B,L] (docs/theory.md §3.3): ``r [1 - D(i) - 1[x != i] (1 + log D(x))]``.

    ``r = -alpha'/(1 - alpha)``, ``i = xt``; ``log D`` floored at ``log 1e-12``. Minimiser: the denoiser.
    """
    lp = _float(den_logp)
    r = -_like(dalpha, lp) / (1 - _like(alpha, lp))
    lDx = _gather(lp, x0).clamp_min(LOG_PROB_FLOOR)
    jump = torch.where(x0 != xt, 1 + lDx, torch.zeros_like(lDx))
    return r * (-torch.expm1(_gather(lp, xt)) - jump)


def mdlm_nelbo(den_logp: Tensor, x0: Tensor, xt: Tensor, alpha: Tensor, dalpha: Tensor, mask_id: int) -> Tensor:
    """MDLM NELBO per token [B,L] (docs/theory.md §3.4): ``(alpha'/(1 - alpha)) log D(x | z)`` at masked positions, else 0."""
    lp = _float(den_logp)
    r = -_like(dalpha, lp) / (1 - _like(alpha, lp))
    lDx = _gather(lp, x0)
    return torch.where(xt == mask_id, -r * lDx, torch.zeros_like(lDx))


def audm_nelbo(den_logp: Tensor, x0: Tensor, xt: Tensor, noise: Tensor, alpha: Tensor, dalpha: Tensor) -> Tensor:
    """AUDM NELBO per token [B,L] (docs/theory.md §3.5): ``r 1[z = n] [1 - p(n) - 1[x != n] (1 + log p(x))]``.

    A masked chain whose mask token at position l is ``n^l``; ``log p`` floored at ``log 1e-12``.
    Minimiser: the AUDM posterior ``p(x^l | z, n)``.
    """
    lp = _float(den_logp)
    r = -_like(dalpha, lp) / (1 - _like(alpha, lp))
    lpx = _gather(lp, x0).clamp_min(LOG_PROB_FLOOR)
    zero = torch.zeros_like(lpx)
    per = -torch.expm1(_gather(lp, noise)) - torch.where(x0 != noise, 1 + lpx, zero)
    return torch.where(xt == noise, r * per, zero)


def denoising_cross_entropy(den_logp: Tensor, x0: Tensor) -> Tensor:
    """Denoising cross-entropy per token [B,L] (docs/theory.md §3.2): ``-log D(x0 | z)``, no time weighting."""
    return -_gather(_float(den_logp), x0)
