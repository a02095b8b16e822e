"""Forward noise processes ``q_t(z | x)``, all factorised over positions (docs/theory.md §1.1-1.3), and what
each one owns for sampling: its prior, its ancestral reverse step, its carry-over, its Gibbs
corrector conditional and the capabilities it declares (``CAPABILITIES``).

Shape legend: ``x0_BL``, ``xt_BL``, ``noise_BL`` LongTensor ``[B, L]``; ``alpha_B1`` float ``[B, 1]``;
``*_probs_BLV`` probability vectors per position, ``alpha_t_B1`` / ``alpha_s_B1`` float64 ``[B, 1]``
with ``s < t``. Randomness always comes from the ``generator`` argument (``None`` = torch's default
generator); it must live on the device of the tensors.

A new process is one file: subclass ``ForwardProcess``, register it with ``@PROCESS.register``,
implement ``corrupt``, ``prior`` and ``ancestral_step`` and declare its ``capabilities``; samplers
and the recipe validator read only those declarations, never the process's name.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, Literal, NamedTuple

import torch
from torch import Tensor

from udmtrain.diffusion import functional as F
from udmtrain.registry import PROCESS

PredictionKind = Literal["denoiser", "loo"]

CAPABILITIES: dict[str, str] = {
    "loo_posterior": "the leave-one-out posterior Lo(x^l | z^{-l}) is defined (LOO parameterization, "
                     "temperature_on='loo')",
    "mask_state": "one absorbing mask state that clean tokens can be sent back to (remasking)",
    "noise_tokens": "per-position noise tokens n travel with z (lifted bridge, noise resampling)",
    "token_states": "every state is a real token (no extra mask state)",
    "gibbs_corrector": "gibbs_conditional / gibbs_update are implemented (predictor-corrector sampling)",
    "time_free_posterior": "the exact denoiser given z does not depend on t (a prediction may be reused "
                           "while z is unchanged)",
}
"""The capability vocabulary: what a process may declare and a sampler may need (one word, one meaning)."""


class Noised(NamedTuple):
    """A noisy batch: ``xt_BL`` and, for the absorbing-uniform process, its noise tokens ``noise_BL``."""

    xt_BL: Tensor
    noise_BL: Tensor | None = None


class ForwardProcess(abc.ABC):
    """A forward corruption process over ``num_states`` token ids.

    Attributes: ``vocab_size`` (the tokenizer's V), ``num_states`` (network head width),
    ``mask_id`` (``None`` unless masked), ``uses_noise_tokens`` (AUDM), ``natural_nelbo`` (registry
    name of the loss that is this process's NELBO: what the objective logs as ``nll``),
    ``capabilities`` (words of ``CAPABILITIES``), ``ancestral_posterior`` (the prediction its
    ancestral step consumes) and ``corrector_posterior`` (the one ``gibbs_conditional`` consumes).
    """

    requires: ClassVar[Mapping[str, frozenset[str]]] = {}
    mask_id: int | None = None
    uses_noise_tokens: bool = False
    natural_nelbo: ClassVar[str]
    capabilities: ClassVar[frozenset[str]] = frozenset()
    ancestral_posterior: ClassVar[PredictionKind] = "denoiser"
    corrector_posterior: ClassVar[PredictionKind] = "denoiser"

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        unknown = set(cls.capabilities) - set(CAPABILITIES)
        if unknown:
            raise TypeError(f"process {cls.__qualname__} declares unknown capabilities {sorted(unknown)}; "
                            f"the vocabulary is {sorted(CAPABILITIES)} (udmtrain/diffusion/process.py)")

    @property
    def supports_loo(self) -> bool:
        """Whether the leave-one-out posterior exists (``"loo_posterior"`` declared)."""
        return "loo_posterior" in self.capabilities

    def __init__(self, cfg, vocab_size: int) -> None:
        if int(vocab_size) < 2:
            raise ValueError(f"process {type(self).__name__}: vocab_size must be >= 2, got {vocab_size}")
        self.cfg = cfg
        self.vocab_size = int(vocab_size)

    @property
    def num_states(self) -> int:
        """Width of the network's output (and of every log-prob tensor of this process)."""
        return self.vocab_size

    @abc.abstractmethod
    def corrupt(self, x0_BL: Tensor, alpha_B1: Tensor, generator: torch.Generator | None) -> Noised:
        """Draw ``z_t ~ q_t(. | x0)``; each token stays clean with probability ``alpha``."""

    @abc.abstractmethod
    def prior(self, batch_size: int, seq_len: int, generator: torch.Generator | None,
              device: torch.device | str = "cpu") -> Noised:
        """Draw ``z_1`` from the prior (``alpha_1 = eps`` residue ignored, docs/theory.md §1)."""

    def known_clean(self, xt_BL: Tensor, noise_BL: Tensor | None = None) -> Tensor | None:
        """Bool ``[B, L]``: positions certainly clean given ``z_t`` (carry-over), or ``None`` if none are."""
        return None

    @abc.abstractmethod
    def ancestral_step(self, probs_BLV: Tensor, xt_BL: Tensor, noise_BL: Tensor | None, alpha_t_B1: Tensor,
                       alpha_s_B1: Tensor, generator: torch.Generator) -> Noised:
        """One reverse step ``t -> s``: draw ``z_s`` given ``z_t`` and the model's prediction.

        ``probs_BLV`` is the ``ancestral_posterior`` object (probabilities, tempered/truncated by the
        sampler). Returns the new state (``noise_BL`` carried or updated)."""

    def gibbs_conditional(self, logp_BLV: Tensor, xt_BL: Tensor, noise_BL: Tensor | None,
                          alpha_B1: Tensor) -> tuple[Tensor, Tensor]:
        """``(log conditional [B, L, V], eligible [B, L])`` of one site given the rest at time s, from
        the ``corrector_posterior`` log-probs; only for processes declaring ``"gibbs_corrector"``."""
        raise NotImplementedError(f"process {type(self).__name__} has no Gibbs corrector (it does not "
                                  "declare 'gibbs_corrector')")

    def gibbs_update(self, xt_BL: Tensor, noise_BL: Tensor | None, chosen_BL: Tensor, new_BL: Tensor) -> Noised:
        """The state after resampling the ``chosen_BL`` sites to ``new_BL`` (default: ``z`` only)."""
        return Noised(torch.where(chosen_BL, new_BL, xt_BL), noise_BL)

    # shared helpers --------------------------------------------------------------------
    @staticmethod
    def _keep(x0_BL: Tensor, alpha_B1: Tensor, generator) -> Tensor:
        """Bool ``[B, L]``: token stays clean (``u < alpha``, u ~ U[0,1) in float64)."""
        u = torch.rand(x0_BL.shape, generator=generator, device=x0_BL.device, dtype=torch.float64)
        return u < alpha_B1.to(device=x0_BL.device, dtype=torch.float64)

    def _uniform_tokens(self, shape, generator, device) -> Tensor:
        return torch.randint(0, self.vocab_size, tuple(shape), generator=generator, device=device)


@PROCESS.register("masked")
class MaskedProcess(ForwardProcess):
    """Absorbing process: ``q_t(z | x) = alpha e_x + (1 - alpha) e_m`` with mask id ``m = V`` (docs/theory.md §1.1)."""

    natural_nelbo = "mdlm_nelbo"
    capabilities = frozenset({"mask_state", "time_free_posterior"})

    @dataclass(kw_only=True, frozen=True)
    class Config:
        pass

    def __init__(self, cfg: Config | None = None, vocab_size: int = 0) -> None:
        super().__init__(cfg if cfg is not None else self.Config(), vocab_size)
        self.mask_id = self.vocab_size

    @property
    def num_states(self) -> int:
        return self.vocab_size + 1

    def known_clean(self, xt_BL, noise_BL=None):
        """Unmasked positions are clean (``z != m``)."""
        return xt_BL != self.mask_id

    def corrupt(self, x0_BL, alpha_B1, generator) -> Noised:
        keep = self._keep(x0_BL, alpha_B1, generator)
        return Noised(torch.where(keep, x0_BL, torch.full_like(x0_BL, self.mask_id)))

    def prior(self, batch_size, seq_len, generator, device="cpu") -> Noised:
        return Noised(torch.full((batch_size, seq_len), self.mask_id, dtype=torch.long, device=device))

    def ancestral_step(self, probs_BLV, xt_BL, noise_BL, alpha_t_B1, alpha_s_B1, generator) -> Noised:
        """MDLM update (:func:`mdlm_step`) with the denoiser."""
        return Noised(mdlm_step(probs_BLV, xt_BL, alpha_t_B1, alpha_s_B1, self.mask_id, generator))


@PROCESS.register("uniform")
class UniformProcess(ForwardProcess):
    """Uniform process: ``q_t(z | x) = alpha e_x + (1 - alpha)/V 1`` over exactly V states (docs/theory.md §1.2, 10.5)."""

    natural_nelbo = "plugin_nelbo"
    capabilities = frozenset({"loo_posterior", "token_states", "gibbs_corrector"})
    ancestral_posterior = "loo"
    corrector_posterior = "loo"

    @dataclass(kw_only=True, frozen=True)
    class Config:
        pass

    def __init__(self, cfg: Config | None = None, vocab_size: int = 0) -> None:
        super().__init__(cfg if cfg is not None else self.Config(), vocab_size)

    def corrupt(self, x0_BL, alpha_B1, generator) -> Noised:
        keep = self._keep(x0_BL, alpha_B1, generator)
        # with probability 1 - alpha resample uniformly (the draw may equal x)
        return Noised(torch.where(keep, x0_BL, self._uniform_tokens(x0_BL.shape, generator, x0_BL.device)))

    def prior(self, batch_size, seq_len, generator, device="cpu") -> Noised:
        return Noised(self._uniform_tokens((batch_size, seq_len), generator, device))

    def ancestral_step(self, probs_BLV, xt_BL, noise_BL, alpha_t_B1, alpha_s_B1, generator) -> Noised:
        """UDLM plug-in bridge (:func:`uniform_plugin_step`) fed the LOO (``ancestral_posterior``)."""
        return Noised(uniform_plugin_step(probs_BLV, xt_BL, alpha_t_B1, alpha_s_B1, generator))

    def gibbs_conditional(self, logp_BLV, xt_BL, noise_BL, alpha_B1):
        """``p_s(z^l = v | z^{-l}) = a_s Lo(v) + (1 - a_s)/V`` at every site (docs/theory.md §2)."""
        return F.noisy_conditional(logp_BLV, alpha_B1), torch.ones_like(xt_BL, dtype=torch.bool)


@PROCESS.register("absorbing_uniform")
class AbsorbingUniformProcess(ForwardProcess):
    """AUDM lift of the uniform process (docs/theory.md §1.3): ``n ~ U^L`` fresh per call, ``z = n`` w.p. ``1 - alpha``.

    The ``(x, z_t)`` marginal equals the uniform process exactly; ``n`` is returned (and must be
    passed to the network) explicitly, never as a tensor attribute (docs/theory.md §10.12).
    """

    uses_noise_tokens = True
    natural_nelbo = "audm_nelbo"
    capabilities = frozenset({"noise_tokens", "token_states", "gibbs_corrector"})

    @dataclass(kw_only=True, frozen=True)
    class Config:
        pass

    def __init__(self, cfg: Config | None = None, vocab_size: int = 0) -> None:
        super().__init__(cfg if cfg is not None else self.Config(), vocab_size)

    def known_clean(self, xt_BL, noise_BL=None):
        """``z != n`` implies clean (docs/theory.md §1.3 carry-over)."""
        if noise_BL is None:
            raise ValueError("the absorbing_uniform process needs its noise tokens noise_BL (got None)")
        return xt_BL != noise_BL

    def corrupt(self, x0_BL, alpha_B1, generator) -> Noised:
        noise = self._uniform_tokens(x0_BL.shape, generator, x0_BL.device)
        keep = self._keep(x0_BL, alpha_B1, generator)
        return Noised(torch.where(keep, x0_BL, noise), noise)

    def prior(self, batch_size, seq_len, generator, device="cpu") -> Noised:
        noise = self._uniform_tokens((batch_size, seq_len), generator, device)
        return Noised(noise.clone(), noise)

    def ancestral_step(self, probs_BLV, xt_BL, noise_BL, alpha_t_B1, alpha_s_B1, generator) -> Noised:
        """AUDM carry-over update (:func:`audm_step`); ``n`` never changes."""
        return Noised(audm_step(probs_BLV, xt_BL, noise_BL, alpha_t_B1, alpha_s_B1, generator), noise_BL)

    def gibbs_conditional(self, logp_BLV, xt_BL, noise_BL, alpha_B1):
        """:func:`audm_conditional` at the active sites (``z = n``), the only eligible ones."""
        return audm_conditional(logp_BLV, xt_BL, alpha_B1), xt_BL == noise_BL

    def gibbs_update(self, xt_BL, noise_BL, chosen_BL, new_BL) -> Noised:
        """A resampled site stays active: ``z = n = new`` there."""
        return Noised(torch.where(chosen_BL, new_BL, xt_BL), torch.where(chosen_BL, new_BL, noise_BL))


# ---------------------------------------------------------------------------- reverse kernels
# Each draws every position independently given ``z_t`` (the usual factorised reverse step): exact per
# position, and exact for the joint law as the number of steps grows (then at most one position changes
# per step). ``categorical`` is imported inside the kernels: the samplers package imports this module.

def mdlm_step(den_probs_BLV, z_BL, alpha_t_B1, alpha_s_B1, mask_id: int, generator) -> torch.Tensor:
    """MDLM ancestral update (docs/theory.md §5.4): ``z_s ~ Cat((a_s - a_t) x̂ + (1 - a_s) e_{z_t})`` at masked
    positions (the weights sum to ``1 - a_t``; the draw needs no normalisation); clean tokens are
    frozen whatever the prediction says. The mask column of ``x̂`` is ignored."""
    from udmtrain.diffusion.samplers import categorical as cat

    a_t, a_s = alpha_t_B1.to(torch.float64), alpha_s_B1.to(torch.float64)
    z_s = cat.sample_mixture(generator, dense_BLV=cat.drop_state(den_probs_BLV, mask_id), dense_weight=a_s - a_t,
                             atoms=[(z_BL, 1 - a_s)])
    return torch.where(z_BL == mask_id, z_s, z_BL)


def uniform_plugin_step(loo_probs_BLV, z_BL, alpha_t_B1, alpha_s_B1, generator) -> torch.Tensor:
    """UDLM reverse step (docs/theory.md §1.2, 5.4): ``z_s ~ N(x̂)/Z(x̂)``, the bridge with ``x̂ = Lo`` plugged in.

    Must be fed the LOO (docs/theory.md §10.8): by linearity of ``N``, ``N(Lo)/Z(Lo) = sum_v D(v) q(z_s | z_t, v)``,
    the exact posterior mixture of bridges; plugging ``D`` double-counts the own token.
    ``N = (a_s - a_t) x̂ + (a_s - a_t)(1 - a_s)/(V a_s) 1 + (V a_t x̂(z) + a_t/a_s - a_t) e_z`` (the
    terms of ``functional.uniform_bridge``) is drawn as that mixture, without forming it.
    """
    from udmtrain.diffusion.samplers import categorical as cat

    V = loo_probs_BLV.shape[-1]
    a_t, a_s = alpha_t_B1.to(torch.float64), alpha_s_B1.to(torch.float64)
    x_z_BL = loo_probs_BLV.gather(-1, z_BL[..., None]).squeeze(-1).to(torch.float64)
    return cat.sample_mixture(generator, dense_BLV=loo_probs_BLV, dense_weight=a_s - a_t,
                              atoms=[(z_BL, V * a_t * x_z_BL + a_t / a_s - a_t)],
                              uniform_weight=(a_s - a_t) * (1 - a_s) / (V * a_s), num_states=V)


def audm_step(den_probs_BLV, z_BL, noise_BL, alpha_t_B1, alpha_s_B1, generator) -> torch.Tensor:
    """AUDM ancestral update (docs/theory.md §4): MDLM with the per-position mask token ``n``.

    Active positions (``z = n``) draw ``z_s ~ Cat((a_s - a_t) p + (1 - a_s) e_{z_t})`` (they stay at
    ``n`` w.p. ``((1-a_s) + (a_s-a_t) p(n)) / (1-a_t)``); inactive ones (``z != n``) are clean and
    frozen; ``n`` never changes.
    """
    from udmtrain.diffusion.samplers import categorical as cat

    a_t, a_s = alpha_t_B1.to(torch.float64), alpha_s_B1.to(torch.float64)
    z_s = cat.sample_mixture(generator, dense_BLV=den_probs_BLV, dense_weight=a_s - a_t, atoms=[(z_BL, 1 - a_s)])
    return torch.where(z_BL == noise_BL, z_s, z_BL)


def audm_conditional(den_logp_BLV, z_BL, alpha_B1) -> torch.Tensor:
    """``log P(z^l = n^l = v | rest, active)`` from the AUDM posterior at active sites -> ``[B, L, V]``.

    Per position ``P(z=v, n=u | x) = [(1-a) 1[u=v] + a 1[v=x]] / V``; at an active site (``z = n = i``)
    the posterior is ``D_A(x) ∝ Lo_A(x) [(1-a) + a 1[x=i]]``, so
    ``log Lo_A = log_softmax(log D_A + log(1-a) e_{z})``; result ``log((1-a) + a Lo_A) - log(V(1-a) + a)``.
    Rows of inactive sites are meaningless (never selected). The full argument is in
    ``udmtrain/diffusion/samplers/pc.py``.
    """
    B, L, V = den_logp_BLV.shape
    a = alpha_B1.to(den_logp_BLV.dtype)[..., None]  # [B, 1, 1]
    shifted = den_logp_BLV.clone()
    shifted.scatter_add_(-1, z_BL[..., None], torch.log1p(-a).expand(B, L, 1))  # log D_A + log(1-a) e_z
    # (1 - a) + a Lo_A, formed in place from softmax (not exp of a log-softmax: the CPU exp of the -1e6
    # entries of carried-over rows is ~10x slower, see categorical.probs_from_logp)
    mixed = torch.softmax(shifted, dim=-1).mul_(a).add_(1 - a)
    return mixed.log_().sub_(torch.log(V * (1 - a) + a))
