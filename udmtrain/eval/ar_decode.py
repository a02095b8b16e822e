"""Left-to-right decoding of the autoregressive baseline with a prompt at any positions.

The AR model's logits at position ``l`` predict token ``l + 1`` (``udmtrain.models.ar``). Decoding
fills positions ``1 .. L-1`` in order: where ``prompt_mask_BL`` is set the prompt's token is kept
(teacher forcing: the model reads it, nothing is drawn), elsewhere the token is drawn from
``softmax(logits_l / T)`` (nucleus-filtered with ``top_p < 1``), or taken as the argmax at ``T = 0``
(greedy decoding). Position 0 has no prediction, so it must be a prompt position in every row.

For a prompt that is a prefix (Sudoku: the puzzle and the separator) this is ordinary conditional
generation; a prompt further right is simply forced when decoding reaches it (the model cannot look
ahead, unlike the diffusion samplers, which see the whole prompt from the first step).

Cost: no key/value cache, so the call for position ``l + 1`` reads the prefix ``x[:, :l + 1]``; a
position that is prompt in every row needs no call. ``nfe`` counts the calls made.

Shape legend: B batch, L length, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from udmtrain.diffusion.samplers.base import SampleOutput
from udmtrain.diffusion.samplers.categorical import sample_categorical, top_p_filter


@dataclass(frozen=True)
class ARPromptDecoder:
    """``sample(network, B, L, generator, tokens_BL, prompt_mask_BL=...) -> SampleOutput``, the call the
    diffusion samplers answer, for an AR network ``x_BL -> logits_BLV``."""

    temperature: float = 0.0
    """0: greedy (argmax; ties to the lowest id); > 0: draws from ``softmax(logits / temperature)``."""
    top_p: float = 1.0
    """Nucleus mass kept before a draw (1 keeps every token); ignored when greedy."""

    def __post_init__(self) -> None:
        if not self.temperature >= 0.0:
            raise ValueError(f"AR decoding: temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"AR decoding: top_p must be in (0, 1], got {self.top_p}")

    def settings(self) -> dict:
        """JSON-able description for the reports."""
        return {"name": "autoregressive", "temperature": self.temperature, "top_p": self.top_p,
                "greedy": self.temperature == 0.0}

    @torch.no_grad()
    def sample(self, network: Callable[[torch.Tensor], torch.Tensor], batch_size: int, seq_len: int,
               generator: torch.Generator, tokens_BL: torch.Tensor, *,
               prompt_mask_BL: torch.Tensor) -> SampleOutput:
        """Decode ``[B, L]`` tokens keeping ``tokens_BL`` where ``prompt_mask_BL`` (bool ``[B, L]``) is set."""
        if tokens_BL.shape != (batch_size, seq_len) or prompt_mask_BL.shape != tokens_BL.shape:
            raise ValueError(f"AR decoding: tokens {tuple(tokens_BL.shape)} and prompt mask "
                             f"{tuple(prompt_mask_BL.shape)} must both be [{batch_size}, {seq_len}]")
        if not bool(prompt_mask_BL[:, 0].all()):
            raise ValueError("AR decoding: position 0 must be a prompt position in every row (nothing predicts it)")
        x_BL = tokens_BL.clone()
        nfe = 0
        for pos in range(1, seq_len):
            free_B = ~prompt_mask_BL[:, pos]
            if not bool(free_B.any()):
                continue  # the prompt's token everywhere: no call needed
            logits_BV = network(x_BL[:, :pos])[:, -1].float()
            nfe += 1
            if self.temperature == 0.0:
                drawn_B = logits_BV.argmax(dim=-1)
            else:
                logp_B1V = torch.log_softmax(logits_BV / self.temperature, dim=-1)[:, None]
                if self.top_p < 1.0:
                    logp_B1V = top_p_filter(logp_B1V, self.top_p)
                drawn_B = sample_categorical(logp_B1V, generator)[:, 0]
            x_BL[:, pos] = torch.where(free_B, drawn_B.to(x_BL.device), x_BL[:, pos])
        return SampleOutput(tokens_BL=x_BL, nfe=nfe)
