"""Exact brute-force oracle for tests: posteriors of the diffusion processes by enumeration.

Everything here is float64 and exact (up to rounding): for a data law ``law`` over all ``V**L``
sequences (``V <= 5``, ``L <= 3`` keeps it tiny), the joint of the clean sequence ``x`` and the noisy
``z_t`` factorises over positions, so every posterior is a weighted sum over the enumerated ``x``:

* uniform process (docs/theory.md §1.2):   ``q_t(z^l | x^l) = alpha 1[z^l = x^l] + (1 - alpha)/V``
* masked process (docs/theory.md §1.1):    ``q_t(z^l | x^l) = alpha 1[z^l = x^l] + (1 - alpha) 1[z^l = m]``, m = V
* AUDM lift (docs/theory.md §1.3/3.5):     ``q_t(z^l | x^l, n^l) = alpha 1[z^l = x^l] + (1 - alpha) 1[z^l = n^l]``

Shapes: ``xt_BL``/``noise_BL`` LongTensor ``[B, L]``; ``alpha`` a float, a ``[B]`` or a ``[B, 1]``
tensor; returned log-probs ``[B, L, V]`` (``V + 1`` for the masked process).

The ``Exact*Network`` classes wrap these as a diffusion "network"
``(xt_BL, sigma_B, noise_BL=None) -> logits_BLV`` with ``alpha = exp(-sigma)`` (the log-linear
convention ``sigma = -log alpha``), so samplers and objectives can be driven with the exact posterior.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

DTYPE = torch.float64


def all_sequences(V: int, L: int) -> torch.Tensor:
    """All ``V**L`` sequences as LongTensor ``[V**L, L]``, lexicographic (position 0 most significant)."""
    return torch.tensor(list(itertools.product(range(V), repeat=L)), dtype=torch.long).reshape(V**L, L)


def seq_index(x_BL: torch.Tensor, V: int) -> torch.Tensor:
    """Row index into ``all_sequences(V, L)`` of each sequence in ``x_BL`` -> LongTensor ``[B]``."""
    L = x_BL.shape[-1]
    powers = V ** torch.arange(L - 1, -1, -1, dtype=torch.long)
    return (x_BL.long() * powers).sum(-1)


def random_law(V: int, L: int, seed: int, concentration: float = 1.0) -> torch.Tensor:
    """A random data law over all sequences: ``Dirichlet(concentration * 1)`` draw, float64 ``[V**L]``."""
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(V**L, float(concentration)))
    p = np.maximum(p, 1e-300)  # tiny concentrations can underflow to exactly 0
    return torch.tensor(p / p.sum(), dtype=DTYPE)


def _alpha_B11(alpha, B: int) -> torch.Tensor:
    a = torch.as_tensor(alpha, dtype=DTYPE)
    return a.reshape(-1, 1, 1).expand(B, 1, 1) if a.numel() > 1 else a.reshape(1, 1, 1).expand(B, 1, 1)


def _factors(xt_BL, alpha, V, L, kind, noise_BL=None) -> torch.Tensor:
    """Per-position likelihoods ``q_t(z^l | x^l)`` for every enumerated x -> ``[B, N, L]`` float64."""
    S_NL = all_sequences(V, L)
    a = _alpha_B11(alpha, xt_BL.shape[0])
    z = xt_BL[:, None, :]
    match = (z == S_NL[None]).to(DTYPE)
    if kind == "uniform":
        return a * match + (1 - a) / V
    if kind == "masked":
        return a * match + (1 - a) * (z == V).to(DTYPE)
    if kind == "audm":
        return a * match + (1 - a) * (z == noise_BL[:, None, :]).to(DTYPE)
    raise ValueError(f"unknown process kind {kind!r}")


def _posterior_logp(law, w_BN_or_BNL, V, L, width) -> torch.Tensor:
    """``log sum_x law(x) w(x) 1[x^l = v] / sum_x law(x) w(x)`` -> ``[B, L, width]`` (columns >= V: -inf).

    ``w`` is ``[B, N]`` (same weight for every position) or ``[B, N, L]`` (per position, for the LOO).
    """
    w_BNL = w_BN_or_BNL if w_BN_or_BNL.dim() == 3 else w_BN_or_BNL[:, :, None].expand(-1, -1, L)
    onehot_NLV = torch.nn.functional.one_hot(all_sequences(V, L), width).to(DTYPE)
    mass_BLV = torch.einsum("bnl,n,nlv->blv", w_BNL, law.to(DTYPE), onehot_NLV)
    return torch.log(mass_BLV / mass_BLV.sum(-1, keepdim=True))


def exact_denoiser(law, V, L, xt_BL, alpha) -> torch.Tensor:
    """``log P(x^l = v | z_t = xt)`` under the uniform process -> ``[B, L, V]``."""
    return _posterior_logp(law, _factors(xt_BL, alpha, V, L, "uniform").prod(-1), V, L, V)


def exact_loo(law, V, L, xt_BL, alpha) -> torch.Tensor:
    """Leave-one-out posterior ``log P(x^l = v | z_t^{-l})`` under the uniform process -> ``[B, L, V]``.

    Weight of x for position l: ``law(x) prod_{k != l} q_t(z^k | x^k)`` (the own factor divided out
    by taking the product over the other positions, never by division, so alpha -> 1 stays exact).
    """
    f_BNL = _factors(xt_BL, alpha, V, L, "uniform")
    w_BNL = torch.stack([torch.cat([f_BNL[..., :l], f_BNL[..., l + 1:]], -1).prod(-1) for l in range(L)], -1)
    return _posterior_logp(law, w_BNL, V, L, V)


def exact_masked_denoiser(law, V, L, xt_BL, alpha, mask_id: int | None = None) -> torch.Tensor:
    """``log P(x^l = v | z_t)`` under the masked process, width ``V + 1`` -> ``[B, L, V + 1]``.

    The mask column (id V) is -inf; clean positions are one-hot (exactly 0 / -inf).
    """
    if mask_id is not None and mask_id != V:
        raise ValueError(f"the oracle's mask id is V={V}, got mask_id={mask_id}")
    return _posterior_logp(law, _factors(xt_BL, alpha, V, L, "masked").prod(-1), V, L, V + 1)


def exact_audm_posterior(law, V, L, xt_BL, noise_BL, alpha) -> torch.Tensor:
    """``log p(x^l = v | z_t, n)`` under the AUDM lift (``z^l = n^l`` w.p. 1-alpha else ``x^l``) -> ``[B, L, V]``.

    Positions with ``z^l != n^l`` are certainly clean (one-hot at ``z^l``).
    """
    return _posterior_logp(law, _factors(xt_BL, alpha, V, L, "audm", noise_BL).prod(-1), V, L, V)


def uniform_transition(V: int, L: int, alpha) -> torch.Tensor:
    """``Q[x, z] = q_t(z | x)`` for the uniform process over all sequences, float64 ``[V**L, V**L]``."""
    S_NL = all_sequences(V, L)
    a = float(alpha)
    match = (S_NL[:, None, :] == S_NL[None, :, :]).to(DTYPE)
    return (a * match + (1 - a) / V).prod(-1)


def uniform_marginal(law, V, L, alpha) -> torch.Tensor:
    """Marginal ``q_t(z) = sum_x law(x) q_t(z | x)`` over all sequences z (uniform process) -> ``[V**L]``."""
    return law.to(DTYPE) @ uniform_transition(V, L, alpha)


def masked_marginal(law, V, L, alpha) -> torch.Tensor:
    """Marginal of the masked process over all ``(V+1)**L`` sequences z (enumerated in base V+1)."""
    Z_ML = all_sequences(V + 1, L)
    a = float(alpha)
    S_NL = all_sequences(V, L)
    f = a * (Z_ML[None] == S_NL[:, None]).to(DTYPE) + (1 - a) * (Z_ML[None] == V).to(DTYPE)
    return law.to(DTYPE) @ f.prod(-1)


def entropy(law) -> float:
    """Shannon entropy (nats) of a law over sequences."""
    p = law.to(DTYPE)
    return float(-(p * torch.log(p)).sum())


class ExactNetwork:
    """An exact posterior used as a diffusion network ``(xt_BL, sigma_B, noise_BL=None) -> logits_BLV``.

    ``kind``: ``"denoiser"`` (uniform, exact log D), ``"loo"`` (uniform, exact log LOO), ``"masked"``
    (masked denoiser, width V+1, mask column -inf) or ``"audm"`` (AUDM posterior; needs ``noise_BL``).
    ``alpha = exp(-sigma)`` per row. ``calls`` counts network evaluations (NFE);
    ``dtype`` is the returned float dtype (float64 by default; -inf entries are kept).
    """

    KINDS = ("denoiser", "loo", "masked", "audm")

    def __init__(self, law, V: int, L: int, kind: str = "denoiser", dtype: torch.dtype = DTYPE):
        if kind not in self.KINDS:
            raise ValueError(f"kind must be one of {self.KINDS}, got {kind!r}")
        self.law, self.V, self.L, self.kind, self.dtype = law.to(DTYPE), V, L, kind, dtype
        self.calls = 0

    @property
    def num_states(self) -> int:
        """Width of the logits: V+1 for the masked process, V otherwise."""
        return self.V + 1 if self.kind == "masked" else self.V

    def __call__(self, xt_BL, sigma_B, noise_BL=None) -> torch.Tensor:
        self.calls += 1
        if xt_BL.shape[-1] != self.L:
            raise ValueError(f"oracle built for L={self.L}, got xt of length {xt_BL.shape[-1]}")
        alpha_B = torch.exp(-torch.as_tensor(sigma_B).to("cpu", DTYPE).reshape(-1)).expand(xt_BL.shape[0])
        xt = xt_BL.cpu().long()
        if self.kind == "denoiser":
            out = exact_denoiser(self.law, self.V, self.L, xt, alpha_B)
        elif self.kind == "loo":
            out = exact_loo(self.law, self.V, self.L, xt, alpha_B)
        elif self.kind == "masked":
            out = exact_masked_denoiser(self.law, self.V, self.L, xt, alpha_B)
        else:
            if noise_BL is None:
                raise ValueError("the AUDM oracle needs noise_BL (the per-position noise tokens n)")
            out = exact_audm_posterior(self.law, self.V, self.L, xt, noise_BL.cpu().long(), alpha_B)
        return out.to(device=xt_BL.device, dtype=self.dtype)


def ExactDenoiserNetwork(law, V, L):  # noqa: N802 - factory named like the class it returns
    """Exact uniform-process denoiser network."""
    return ExactNetwork(law, V, L, "denoiser")


def ExactLOONetwork(law, V, L):  # noqa: N802
    """Exact uniform-process LOO network."""
    return ExactNetwork(law, V, L, "loo")


def ExactMaskedNetwork(law, V, L):  # noqa: N802
    """Exact masked-process denoiser network (width V+1)."""
    return ExactNetwork(law, V, L, "masked")


def ExactAUDMNetwork(law, V, L):  # noqa: N802
    """Exact AUDM posterior network (needs noise_BL)."""
    return ExactNetwork(law, V, L, "audm")
