"""Autoregressive baseline loss: exact next-token negative log-likelihood.

Shape legend: ``logits_BLV`` float ``[B, L, V]`` (position l predicts token l+1); ``x_BL`` LongTensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from udmtrain.registry import LOSS


@LOSS.register("ar_nll")
class ARNLLLoss:
    """``-log p(x_l | x_{<l})`` for ``l >= 1``; the first token is not predicted (its loss is 0 and the
    objective does not count it). Exact NLL, so ``is_nelbo = True``."""

    requires = {"model": frozenset({"ar_transformer"})}
    is_nelbo: ClassVar[bool] = True

    @dataclass(kw_only=True, frozen=True)
    class Config:
        pass

    def __init__(self, cfg: Config | None = None, process=None) -> None:
        self.cfg = cfg if cfg is not None else self.Config()

    def per_token(self, logits_BLV: Tensor, x_BL: Tensor) -> Tensor:
        """``[B, L]``: entry l >= 1 is ``-log softmax(logits[:, l-1])[x_l]`` (float32); entry 0 is 0."""
        logp = torch.log_softmax(logits_BLV[:, :-1].float(), dim=-1)
        nll = -logp.gather(-1, x_BL[:, 1:].unsqueeze(-1)).squeeze(-1)
        return torch.cat([torch.zeros_like(nll[:, :1]), nll], dim=1)

    @staticmethod
    def counted(valid_BL: Tensor) -> Tensor:
        """Bool ``[B, L]`` of positions whose loss counts: valid targets, never position 0."""
        mask = valid_BL.bool().clone()
        mask[:, 0] = False
        return mask
