"""What the network's logits mean: the denoiser ``D(x^l | z_t)`` or the leave-one-out posterior (docs/theory.md §2).

Shape legend: ``logits_BLV`` float ``[B, L, V]`` (``V = process.num_states``); ``xt_BL``,
``noise_BL`` LongTensor ``[B, L]``; ``alpha_B1`` float ``[B, 1]``. Outputs are float32 log-probs
(float64 if the logits are float64); bf16 logits are upcast before any conversion (docs/theory.md §10.6).
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from udmtrain.diffusion import functional as F
from udmtrain.diffusion.process import ForwardProcess
from udmtrain.registry import PARAMETERIZATION

#: Log-prob given to impossible tokens (suppressed mask logit, carried-over positions). Finite so
#: that ``p * log p`` and gradients stay NaN-free; ``exp(NEG_LOGIT) == 0`` exactly in float32.
NEG_LOGIT = -1e6


def _check_width(logits_BLV: Tensor, process: ForwardProcess) -> None:
    if logits_BLV.shape[-1] != process.num_states:
        raise ValueError(
            f"network logits have width {logits_BLV.shape[-1]} but the {type(process).__name__} "
            f"has {process.num_states} states; build the network with that head width"
        )


class Parameterization(abc.ABC):
    """Turns raw network logits into the denoiser (and, for the uniform process, the LOO) log-probs."""

    requires: ClassVar[Mapping[str, frozenset[str]]] = {}

    def __init__(self, cfg, process: ForwardProcess) -> None:
        self.cfg = cfg
        self.process = process

    @abc.abstractmethod
    def denoiser_logp(self, logits_BLV: Tensor, xt_BL: Tensor, alpha_B1: Tensor,
                      noise_BL: Tensor | None = None) -> Tensor:
        """``log D(x^l = v | z_t)`` ``[B, L, V]`` (with carry-over for masked / absorbing-uniform)."""

    @abc.abstractmethod
    def loo_logp(self, logits_BLV: Tensor, xt_BL: Tensor, alpha_B1: Tensor,
                 noise_BL: Tensor | None = None) -> Tensor:
        """``log Lo(x^l = v | z_t^{-l})`` ``[B, L, V]`` (uniform process only)."""

    def _require_loo(self) -> None:
        if not self.process.supports_loo:
            raise ValueError(
                f"the leave-one-out posterior is defined for the uniform process only, not for "
                f"{type(self.process).__name__}; use a loss that needs the denoiser"
            )


@PARAMETERIZATION.register("denoiser")
class DenoiserParameterization(Parameterization):
    """Logits are the denoiser ``D`` ("mean"). Masked: mask logit suppressed; known-clean positions
    (unmasked, or ``z != n`` for AUDM) frozen to ``e_z`` (carry-over, docs/theory.md §3.4/3.5).
    Uniform: ``loo_logp = denoiser_to_loo`` (subtract ``delta_t`` at the observed token)."""

    @dataclass(kw_only=True, frozen=True)
    class Config:
        pass

    def __init__(self, cfg: Config | None = None, process: ForwardProcess | None = None) -> None:
        super().__init__(cfg if cfg is not None else self.Config(), process)

    def denoiser_logp(self, logits_BLV, xt_BL, alpha_B1, noise_BL=None):
        _check_width(logits_BLV, self.process)
        logits = F.upcast(logits_BLV)
        mask_id = self.process.mask_id
        if mask_id is not None:  # the clean-data posterior never puts mass on the mask
            logits = logits.index_fill(-1, torch.tensor([mask_id], device=logits.device), NEG_LOGIT)
        logp = torch.log_softmax(logits, dim=-1)
        clean_BL = self.process.known_clean(xt_BL, noise_BL)
        if clean_BL is None:
            return logp
        # carry-over: a known-clean position is e_z (log-prob 0 at z, NEG_LOGIT elsewhere). ``logp`` is this
        # function's own tensor: without autograd (sampling) it is overwritten in place, saving two
        # [B, L, V] copies; log_softmax's backward needs its output, so training takes the copies.
        inplace = not logp.requires_grad
        frozen = logp.masked_fill_(clean_BL.unsqueeze(-1), NEG_LOGIT) if inplace else \
            logp.masked_fill(clean_BL.unsqueeze(-1), NEG_LOGIT)
        at_z = torch.where(clean_BL, torch.zeros((), dtype=logp.dtype, device=logp.device),
                           F.gather_tokens(frozen, xt_BL))
        index = xt_BL.unsqueeze(-1)
        return frozen.scatter_(-1, index, at_z.unsqueeze(-1)) if inplace else \
            frozen.scatter(-1, index, at_z.unsqueeze(-1))

    def loo_logp(self, logits_BLV, xt_BL, alpha_B1, noise_BL=None):
        self._require_loo()
        _check_width(logits_BLV, self.process)
        return F.denoiser_to_loo(logits_BLV, xt_BL, alpha_B1)


@PARAMETERIZATION.register("loo")
class LOOParameterization(Parameterization):
    """Logits are the leave-one-out posterior ("mean_loo"); ``D = loo_to_denoiser`` (add ``delta_t`` at z)."""

    requires = {"process": frozenset({"uniform"})}

    @dataclass(kw_only=True, frozen=True)
    class Config:
        pass

    def __init__(self, cfg: Config | None = None, process: ForwardProcess | None = None) -> None:
        super().__init__(cfg if cfg is not None else self.Config(), process)
        self._require_loo()

    def denoiser_logp(self, logits_BLV, xt_BL, alpha_B1, noise_BL=None):
        _check_width(logits_BLV, self.process)
        return F.loo_to_denoiser(logits_BLV, xt_BL, alpha_B1)

    def loo_logp(self, logits_BLV, xt_BL, alpha_B1, noise_BL=None):
        _check_width(logits_BLV, self.process)
        return torch.log_softmax(F.upcast(logits_BLV), dim=-1)
