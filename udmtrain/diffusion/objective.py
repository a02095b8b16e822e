"""Training objectives: corrupt, call the network, average the per-token loss over valid tokens.

Shape legend: ``x0_BL`` LongTensor ``[B, L]``; ``valid_BL`` bool ``[B, L]``; ``t_B`` float ``[B]``.
The network is any callable ``(xt_BL, sigma_B, noise_BL | None) -> logits_BLV`` (diffusion) or
``(x_BL) -> logits_BLV`` (AR); its logits may be bf16 and are upcast to float32 before any math.
With ``doc_ids_BL`` (LongTensor ``[B, L]``, the loader's per-token document ids, -1 on padding) the
network is also called with the keyword ``doc_ids_BL=...`` (attention restricted to each token's own
document, ``data.document_attention``); without it the keyword is not passed at all, so networks
that do not know it (test oracles) keep working.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor

from udmtrain.diffusion.functional import upcast
from udmtrain.diffusion.losses import DiffusionLoss, nelbo_loss_for
from udmtrain.diffusion.parameterization import Parameterization
from udmtrain.diffusion.process import ForwardProcess, Noised
from udmtrain.diffusion.schedule import Schedule
from udmtrain.diffusion.time_sampling import iid_times, sample_times, stratified_times  # noqa: F401 (re-export)


class LossOutput(NamedTuple):
    """``loss``: differentiable mean over valid tokens; ``nelbo_sum``, ``loss_sum`` (detached sums over
    valid tokens, for exact token-weighted reduction across ranks); ``num_tokens``: valid token count."""

    loss: Tensor
    nelbo_sum: Tensor
    loss_sum: Tensor
    num_tokens: Tensor


def _reduce(per_token_BL: Tensor, nelbo_BL: Tensor, mask_BL: Tensor) -> LossOutput:
    mask = mask_BL.to(per_token_BL.device).bool()
    zero = torch.zeros((), dtype=per_token_BL.dtype, device=per_token_BL.device)
    loss_sum = torch.where(mask, per_token_BL, zero).sum()  # where, not *: NaN/inf at padding stay out
    num = mask.sum()
    nelbo_sum = torch.where(mask, nelbo_BL.detach(), zero).sum()
    return LossOutput(loss_sum / num.clamp_min(1), nelbo_sum, loss_sum.detach(), num)


def _scored(valid_BL: Tensor, prompt_BL: Tensor | None) -> Tensor:
    """``valid & ~prompt``: the positions whose loss counts (prompt positions are conditioning only)."""
    if prompt_BL is None:
        return valid_BL
    if prompt_BL.shape != valid_BL.shape:
        raise ValueError(f"prompt_BL has shape {tuple(prompt_BL.shape)} but the tokens have shape "
                         f"{tuple(valid_BL.shape)}; pass the batch's 'prompt' [B, L]")
    return valid_BL.bool() & ~prompt_BL.to(valid_BL.device).bool()


def clamp_prompt(noised: Noised, x0_BL: Tensor, prompt_BL: Tensor | None, vocab_size: int) -> Noised:
    """``noised`` with the prompt positions clean: ``z = x0`` there, and AUDM noise ``n = (x0 + 1) mod V``
    (``n != z`` marks a position certainly clean). Shapes ``[B, L]``; returns new tensors."""
    if prompt_BL is None:
        return noised
    prompt = prompt_BL.to(x0_BL.device).bool()
    xt_BL = torch.where(prompt, x0_BL, noised.xt_BL)
    noise_BL = noised.noise_BL
    if noise_BL is not None:
        noise_BL = torch.where(prompt, (x0_BL + 1) % vocab_size, noise_BL)
    return Noised(xt_BL, noise_BL)


def _doc_kwargs(doc_ids_BL: Tensor | None, x_BL: Tensor) -> dict:
    """``{"doc_ids_BL": ...}`` on ``x_BL``'s device when document ids are given, else ``{}``."""
    if doc_ids_BL is None:
        return {}
    if doc_ids_BL.shape != x_BL.shape:
        raise ValueError(f"doc_ids_BL has shape {tuple(doc_ids_BL.shape)} but the tokens have shape "
                         f"{tuple(x_BL.shape)}; pass the batch's 'doc_ids' [B, L]")
    return {"doc_ids_BL": doc_ids_BL.to(x_BL.device)}


class DiffusionObjective:
    """``schedule -> process.corrupt -> network -> loss.per_token``, averaged over valid tokens.

    ``nelbo_loss`` (logged as ``nll``) defaults to ``nelbo_loss_for(loss, process)``: the loss itself
    when it is a NELBO, else the process's natural NELBO (or the loss's configured ``bound``).
    """

    def __init__(self, schedule: Schedule, process: ForwardProcess, parameterization: Parameterization,
                 loss: DiffusionLoss, nelbo_loss: DiffusionLoss | None = None) -> None:
        self.schedule, self.process, self.parameterization, self.loss = schedule, process, parameterization, loss
        self.nelbo_loss = nelbo_loss if nelbo_loss is not None else nelbo_loss_for(loss, process)

    def _forward(self, network: Callable, x0_BL: Tensor, t_B: Tensor, generator: torch.Generator | None,
                 doc_ids_BL: Tensor | None = None, prompt_BL: Tensor | None = None):
        """Corrupt ``x0_BL`` at times ``t_B`` and call the network -> the loss arguments (fp32 logits).

        ``doc_ids_BL`` (optional ``[B, L]``) is handed to the network as the keyword ``doc_ids_BL``;
        positions where ``prompt_BL`` is True stay clean (:func:`clamp_prompt`)."""
        t_B = t_B.to(device=x0_BL.device, dtype=torch.float64 if t_B.dtype == torch.float64 else torch.float32)
        alpha_B, dalpha_B = self.schedule.alpha(t_B)
        alpha_B1, dalpha_B1 = alpha_B.unsqueeze(-1), dalpha_B.unsqueeze(-1)
        noised = clamp_prompt(self.process.corrupt(x0_BL, alpha_B1, generator), x0_BL, prompt_BL,
                              self.process.vocab_size)
        logits_BLV = upcast(network(noised.xt_BL, self.schedule.sigma(t_B), noised.noise_BL,
                                    **_doc_kwargs(doc_ids_BL, x0_BL)))
        return (self.parameterization, logits_BLV, x0_BL, noised, alpha_B1, dalpha_B1)

    def __call__(self, network: Callable, x0_BL: Tensor, valid_BL: Tensor, t_B: Tensor,
                 generator: torch.Generator | None = None, *, doc_ids_BL: Tensor | None = None,
                 prompt_BL: Tensor | None = None) -> LossOutput:
        """One Monte-Carlo NELBO/loss estimate with one time per sequence (``t_B``).

        ``doc_ids_BL``: optional per-token document ids ``[B, L]`` for a document attention mask;
        ``prompt_BL``: optional bool ``[B, L]`` of clean, unscored conditioning positions."""
        args = self._forward(network, x0_BL, t_B, generator, doc_ids_BL, prompt_BL)
        per_token_BL = self.loss.per_token(*args)
        if self.nelbo_loss is self.loss:
            nelbo_BL = per_token_BL.detach()
        else:
            with torch.no_grad():
                nelbo_BL = self.nelbo_loss.per_token(*args)
        return _reduce(per_token_BL, nelbo_BL, _scored(valid_BL, prompt_BL))

    def per_token_nelbo(self, network: Callable, x0_BL: Tensor, t_B: Tensor,
                        generator: torch.Generator | None = None, *, doc_ids_BL: Tensor | None = None,
                        prompt_BL: Tensor | None = None) -> Tensor:
        """The NELBO integrand ``[B, L]`` at times ``t_B`` (for evaluation; padding is not masked).

        ``doc_ids_BL``: optional per-token document ids ``[B, L]`` for a document attention mask;
        ``prompt_BL``: optional bool ``[B, L]``, positions kept clean (their entries are 0: never noised,
        so the NELBO integrand vanishes there; the caller excludes them from its counts)."""
        args = self._forward(network, x0_BL, t_B, generator, doc_ids_BL, prompt_BL)
        nelbo_BL = self.nelbo_loss.per_token(*args)
        if prompt_BL is None:
            return nelbo_BL
        return torch.where(prompt_BL.to(nelbo_BL.device).bool(), torch.zeros_like(nelbo_BL), nelbo_BL)


class ARObjective:
    """Next-token NLL of an AR network ``network(x_BL) -> logits_BLV``; ``nelbo_sum`` is the exact NLL sum.

    Position 0 is never predicted, so ``num_tokens`` counts valid positions ``l >= 1``.
    """

    def __init__(self, loss) -> None:
        self.loss = loss

    def __call__(self, network: Callable, x0_BL: Tensor, valid_BL: Tensor, t_B: Tensor | None = None,
                 generator: torch.Generator | None = None, *, doc_ids_BL: Tensor | None = None,
                 prompt_BL: Tensor | None = None) -> LossOutput:
        """``t_B``/``generator`` are accepted (and ignored) so the trainer can call both objectives alike.

        ``doc_ids_BL``: optional per-token document ids ``[B, L]``, handed to the network as the
        keyword ``doc_ids_BL`` (causal attention within each token's own document); ``prompt_BL``:
        optional bool ``[B, L]``: those tokens are read but not predicted (their targets do not count)."""
        nll_BL = self.loss.per_token(network(x0_BL, **_doc_kwargs(doc_ids_BL, x0_BL)).float(), x0_BL)
        return _reduce(nll_BL, nll_BL.detach(), self.loss.counted(_scored(valid_BL, prompt_BL)))
