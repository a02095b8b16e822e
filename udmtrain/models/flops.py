"""Parameter and model-FLOP counts (for logging and MFU), derived from the layer shapes.

Training FLOPs per token (Kaplan et al. 2020 / PaLM appendix B convention)::

    flops_per_token = 6 * N_matmul + 12 * num_blocks * D * seq_len

* ``N_matmul`` = weights of every Linear applied *per token*: QKV, attention out, MLP, the output
  head and the AUDM input fusion. Excluded: embedding tables (lookups, no FLOPs), norms and biases
  (element-wise, negligible), and the layers applied once per *sequence* (time embedding MLP and
  every ``adaLN`` Linear). 6 = 2 (multiply-add) x 3 (forward + backward w.r.t. inputs and weights).
* attention scores and the weighted sum: ``2 * 2 * seq_len * D`` forward FLOPs per token and per block,
  x3 for training = ``12 * D * seq_len``. Counted in full for causal attention too (the usual MFU
  convention; the kernel skips about half of that work).

MFU = flops_per_token * tokens_per_second / peak_flops. Each model reports its own count
(``num_flops_per_token(seq_len)``; the transformers here use ``transformer_flops_per_token``), so a new
architecture counts itself and this module names none.
"""

from __future__ import annotations

import torch
from torch import nn

from udmtrain.models.layers import TokenEmbedding

_PER_SEQUENCE = ("adaLN", "time_embedding")  # names of per-sequence submodules (time conditioning)


def num_params(model: nn.Module, *, exclude_embeddings: bool = False) -> int:
    """Number of parameters (each shared tensor once); optionally without the token-embedding tables."""
    skip: set[int] = set()
    if exclude_embeddings:
        skip = {id(p) for m in model.modules() if isinstance(m, TokenEmbedding) for p in m.parameters()}
    seen: dict[int, int] = {id(p): p.numel() for p in model.parameters() if id(p) not in skip}
    return sum(seen.values())


def num_matmul_params(model: nn.Module) -> int:
    """``N_matmul``: weights of the Linear layers applied to every token (see module docstring)."""
    total = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and not any(part in _PER_SEQUENCE for part in name.split(".")):
            total += module.weight.numel()
    return total


def transformer_flops_per_token(model: nn.Module, seq_len: int) -> float:
    """``6 N_matmul + 12 num_blocks D seq_len`` (module docstring) for a model exposing ``num_blocks``
    and ``hidden_size``: what a transformer's ``num_flops_per_token`` returns."""
    try:
        num_blocks, dim = int(model.num_blocks), int(model.hidden_size)
    except AttributeError:
        raise TypeError(f"transformer_flops_per_token: {type(model).__name__} lacks num_blocks/hidden_size") from None
    return float(6 * num_matmul_params(model) + 12 * num_blocks * dim * seq_len)


def flops_per_token(model_or_cfg: nn.Module | object, seq_len: int, *, vocab_size: int | None = None,
                    uses_noise_tokens: bool = False) -> float:
    """Training FLOPs per token, as the model counts itself (``model.num_flops_per_token(seq_len)``).

    ``model_or_cfg``: a built model, or the ``Config`` of a registered model (then ``vocab_size`` is
    required and the model is instantiated on the meta device: no memory).
    """
    if isinstance(model_or_cfg, nn.Module):
        model = model_or_cfg
    else:
        if vocab_size is None:
            raise TypeError("flops_per_token(cfg, seq_len): vocab_size= is required when given a Config")
        model = build_on_meta(model_or_cfg, vocab_size, uses_noise_tokens)
    count = getattr(model, "num_flops_per_token", None)
    if count is None:
        raise TypeError(f"flops_per_token: {type(model).__name__} has no num_flops_per_token(seq_len); every "
                        "udmtrain model counts its own FLOPs (see udmtrain.models.flops)")
    return float(count(seq_len))


def build_on_meta(cfg: object, vocab_size: int, uses_noise_tokens: bool = False) -> nn.Module:
    """Instantiate the registered model class whose ``Config`` is ``type(cfg)`` on the meta device
    (shapes only, for counting)."""
    from udmtrain.registry import MODEL

    for name in MODEL.names():
        cls = MODEL.get(name)
        if type(cfg) is cls.Config:
            with torch.device("meta"):
                return cls(cfg, vocab_size, uses_noise_tokens)
    raise TypeError(f"build_on_meta: {type(cfg).__qualname__} is not the Config of a registered model")
