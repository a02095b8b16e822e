"""Training objectives: corrupt, call the network, average the per-token loss over valid tokens.

Shape legend: ``x0_BL`` LongTensor ``[B, L]``; ``valid_BL`` bool ``[B, L]``; ``t_B`` float ``[B]``.
The network is any callable ``(xt_BL, sigma_B, noise_BL | None) -> logits_BLV`` (diffusion) or
``(x_BL) -> logits_BLV`` (AR); its logits may be bf16 and are upcast to float32 before any math.
With ``doc_ids_BL`` (LongTensor ``[B, L]``, the loader's per-token document ids, -1 on padding) the
network is also called with the keyword ``doc_ids_BL=...`` (attention restricted to each token's own
document, ``data.document_attention``); without it the keyword is not passed at all, so networks
that do not know it (test oracles) keep working.

Memory: the vocabulary-wide loss math (upcast, log-softmax, the conversions, the NELBO's ``[B, L, V]``
terms) makes several float32 ``[B, L, V]`` tensors, and autograd would keep some of them for the
backward pass: at V = 50,257, B = 16, L = 1024 each is 3.3 GB. Above ``chunk_elements`` logits
entries, :func:`chunked_per_token` therefore evaluates the per-token loss over slices of positions,
each under activation checkpointing (only the network's logits are kept; a slice's intermediates are
rebuilt in the backward pass, one slice at a time), so at most the logits and one slice's float32
temporaries are alive. Every loss is position-wise given ``alpha_B1``, so the result is the same
per-token tensor, position by position.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.utils.checkpoint
from torch import Tensor

from udmtrain.diffusion.functional import upcast
from udmtrain.diffusion.losses import DiffusionLoss, nelbo_loss_for
from udmtrain.diffusion.parameterization import Parameterization
from udmtrain.diffusion.process import ForwardProcess, Noised
from udmtrain.diffusion.schedule import Schedule
from udmtrain.diffusion.time_sampling import antithetic_times, iid_times, sample_times  # noqa: F401 (re-export)


#: Logits entries (``B * L * V``) above which the loss is evaluated in checkpointed position slices:
#: 2^26 entries = 256 MB in float32. Each slice holds about ``2^24`` entries (64 MB per float32 temporary).
CHUNK_ELEMENTS = 1 << 26
SLICE_ELEMENTS = 1 << 24


def chunked_per_token(per_token: Callable, param: Parameterization, logits_BLV: Tensor, x0_BL: Tensor,
                      noised: Noised, alpha_B1: Tensor, dalpha_B1: Tensor,
                      slice_elements: int = SLICE_ELEMENTS) -> Tensor:
    """``per_token(param, logits, x0, noised, alpha, dalpha)`` -> ``[B, L]``, over slices of positions.

    Positions are split into slices of ``~slice_elements / (B V)`` positions; each slice's loss runs
    under non-reentrant activation checkpointing when gradients are needed (its float32 temporaries are
    freed after the forward and rebuilt in the backward), plainly under ``no_grad``. The losses are
    position-wise given ``alpha_B1`` / ``dalpha_B1`` (``[B, 1]``), so the concatenation equals the
    unsliced result and so do the gradients. ``logits_BLV`` may be bf16: the upcast happens per slice.
    """
    B, L, V = logits_BLV.shape
    step = max(1, int(slice_elements) // max(1, B * V))
    if step >= L:
        return per_token(param, logits_BLV, x0_BL, noised, alpha_B1, dalpha_B1)
    sizes = [min(step, L - start) for start in range(0, L, step)]
    noise_parts = noised.noise_BL.split(sizes, dim=1) if noised.noise_BL is not None else [None] * len(sizes)
    grad = torch.is_grad_enabled() and logits_BLV.requires_grad

    def part(logits_part, x0_part, xt_part, noise_part):
        return per_token(param, upcast(logits_part), x0_part, Noised(xt_part, noise_part), alpha_B1, dalpha_B1)

    outs = []
    for args in zip(logits_BLV.split(sizes, dim=1), x0_BL.split(sizes, dim=1), noised.xt_BL.split(sizes, dim=1),
                    noise_parts):
        if grad:
            outs.append(torch.utils.checkpoint.checkpoint(part, *args, use_reentrant=False,
                                                          preserve_rng_state=False))
        else:
            outs.append(part(*args))
    return torch.cat(outs, dim=1)


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
                 loss: DiffusionLoss, nelbo_loss: DiffusionLoss | None = None,
                 chunk_elements: int = CHUNK_ELEMENTS) -> None:
        self.schedule, self.process, self.parameterization, self.loss = schedule, process, parameterization, loss
        self.nelbo_loss = nelbo_loss if nelbo_loss is not None else nelbo_loss_for(loss, process)
        self.chunk_elements = int(chunk_elements)
        """Logits entries above which the loss runs in checkpointed position slices (module docstring)."""

    def _per_token(self, loss: DiffusionLoss, args: tuple) -> Tensor:
        """``loss.per_token(*args)``, in position slices when the logits exceed ``chunk_elements``."""
        logits_BLV = args[1]
        if logits_BLV.numel() <= self.chunk_elements:
            return loss.per_token(args[0], upcast(logits_BLV), *args[2:])
        return chunked_per_token(loss.per_token, *args, slice_elements=min(SLICE_ELEMENTS, self.chunk_elements))

    def _forward(self, network: Callable, x0_BL: Tensor, t_B: Tensor, generator: torch.Generator | None,
                 doc_ids_BL: Tensor | None = None, prompt_BL: Tensor | None = None):
        """Corrupt ``x0_BL`` at times ``t_B`` and call the network -> the loss arguments (the network's
        logits as they come, e.g. bf16: :meth:`_per_token` upcasts them, per slice when chunked).

        ``doc_ids_BL`` (optional ``[B, L]``) is handed to the network as the keyword ``doc_ids_BL``;
        positions where ``prompt_BL`` is True stay clean (:func:`clamp_prompt`)."""
        t_B = t_B.to(device=x0_BL.device, dtype=torch.float64 if t_B.dtype == torch.float64 else torch.float32)
        alpha_B, dalpha_B = self.schedule.alpha(t_B)
        alpha_B1, dalpha_B1 = alpha_B.unsqueeze(-1), dalpha_B.unsqueeze(-1)
        noised = clamp_prompt(self.process.corrupt(x0_BL, alpha_B1, generator), x0_BL, prompt_BL,
                              self.process.vocab_size)
        logits_BLV = network(noised.xt_BL, self.schedule.sigma(t_B), noised.noise_BL, **_doc_kwargs(doc_ids_BL, x0_BL))
        return (self.parameterization, logits_BLV, x0_BL, noised, alpha_B1, dalpha_B1)

    def __call__(self, network: Callable, x0_BL: Tensor, valid_BL: Tensor, t_B: Tensor,
                 generator: torch.Generator | None = None, *, doc_ids_BL: Tensor | None = None,
                 prompt_BL: Tensor | None = None) -> LossOutput:
        """One Monte-Carlo NELBO/loss estimate with one time per sequence (``t_B``).

        ``doc_ids_BL``: optional per-token document ids ``[B, L]`` for a document attention mask;
        ``prompt_BL``: optional bool ``[B, L]`` of clean, unscored conditioning positions."""
        args = self._forward(network, x0_BL, t_B, generator, doc_ids_BL, prompt_BL)
        per_token_BL = self._per_token(self.loss, args)
        if self.nelbo_loss is self.loss:
            nelbo_BL = per_token_BL.detach()
        else:
            with torch.no_grad():
                nelbo_BL = self._per_token(self.nelbo_loss, args)
        return _reduce(per_token_BL, nelbo_BL, _scored(valid_BL, prompt_BL))

    def per_token_nelbo(self, network: Callable, x0_BL: Tensor, t_B: Tensor,
                        generator: torch.Generator | None = None, *, doc_ids_BL: Tensor | None = None,
                        prompt_BL: Tensor | None = None) -> Tensor:
        """The NELBO integrand ``[B, L]`` at times ``t_B`` (for evaluation; padding is not masked).

        ``doc_ids_BL``: optional per-token document ids ``[B, L]`` for a document attention mask;
        ``prompt_BL``: optional bool ``[B, L]``, positions kept clean (their entries are 0: never noised,
        so the NELBO integrand vanishes there; the caller excludes them from its counts)."""
        args = self._forward(network, x0_BL, t_B, generator, doc_ids_BL, prompt_BL)
        nelbo_BL = self._per_token(self.nelbo_loss, args)
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
