"""Autoregressive baseline: the DiT's blocks without adaLN or time, plain pre-LN, causal attention.

``ARTransformer(cfg, vocab_size)``: ``forward(x_BL, doc_ids_BL=None) -> logits_BLV`` where the
logits at position ``l`` predict token ``l + 1`` (the AR objective shifts the targets).

Input: ``Emb(x)`` (+ a learned position table with ``learned_positions > 0``, as the DiT's).
Block: ``x += Drop(Attn_causal(LN x)); x += Drop(MLP(LN x))`` with the same fp32 LayerNorm without
bias, RoPE, QKV/out projections without bias and GELU(tanh) MLP as the DiT; final LayerNorm and a
zero-init ``Linear(D -> V)`` head (uniform initial predictions, like the DiT).
Precision as in ``dit.py``: under autocast the logits are bf16; the objective upcasts.

Shape legend: B batch, L length, D hidden, V vocab_size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from udmtrain.models.attention import SelfAttention
from udmtrain.models.flops import transformer_flops_per_token
from udmtrain.models.layers import MLP, LayerNorm, LearnedPositions, TokenEmbedding, resolve_size
from udmtrain.registry import MODEL


class ARBlock(nn.Module):
    """Pre-LN causal transformer block: [B, L, D] -> [B, L, D]."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: int, dropout: float, attn_backend: str) -> None:
        super().__init__()
        self.norm1, self.norm2 = LayerNorm(dim), LayerNorm(dim)
        self.attn = SelfAttention(dim, num_heads, causal=True, attn_backend=attn_backend)
        self.mlp = MLP(dim, mlp_ratio)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x_BLD: torch.Tensor, doc_ids_BL: torch.Tensor | None) -> torch.Tensor:
        x_BLD = x_BLD + self.dropout(self.attn(self.norm1(x_BLD), doc_ids_BL))
        return x_BLD + self.dropout(self.mlp(self.norm2(x_BLD)))


@MODEL.register("ar_transformer")
class ARTransformer(nn.Module):
    """Causal transformer LM: ``x_BL -> next-token logits_BLV``."""

    @dataclass(kw_only=True, frozen=True)
    class Config:
        size: Literal["tiny", "small", "medium"] | None = None
        """Preset: tiny 256d/8 blocks/8 heads, small 768/12/12, medium 1024/24/16. With a preset,
        hidden_size/num_blocks/num_heads must be omitted or equal to it."""
        hidden_size: int | None = None
        """Model width D (required without ``size``)."""
        num_blocks: int | None = None
        """Number of transformer blocks (required without ``size``)."""
        num_heads: int | None = None
        """Attention heads; D / num_heads must be even (rotary)."""
        mlp_ratio: int = 4
        """MLP hidden width = mlp_ratio * D."""
        dropout: float = 0.1
        """Dropout on each residual branch (none inside attention)."""
        attn_backend: Literal["auto", "flash", "sdpa"] = "auto"
        """Attention kernel: auto (flash if on CUDA and installed, else sdpa; the reason is logged),
        flash (fails loudly if unavailable), sdpa."""
        learned_positions: int = 0
        """Length N of a learned absolute position table added to the input embedding, on top of RoPE:
        0 = none; otherwise N >= data.seq_len (as the DiT's)."""

        def __post_init__(self) -> None:
            resolve_size("model (ar_transformer)", self.size, self.hidden_size, self.num_blocks, self.num_heads)
            if self.learned_positions < 0:
                raise ValueError("model (ar_transformer): learned_positions must be >= 0 (0 = none), got "
                                 f"{self.learned_positions}")
            if self.mlp_ratio <= 0:
                raise ValueError(f"model (ar_transformer): mlp_ratio must be positive, got {self.mlp_ratio}")
            if not 0.0 <= self.dropout < 1.0:
                raise ValueError(f"model (ar_transformer): dropout must be in [0, 1), got {self.dropout}")

        def dims(self) -> tuple[int, int, int]:
            """Resolved (hidden_size, num_blocks, num_heads)."""
            return resolve_size(
                "model (ar_transformer)", self.size, self.hidden_size, self.num_blocks, self.num_heads
            )

    def __init__(self, cfg: Config, vocab_size: int, uses_noise_tokens: bool = False) -> None:
        super().__init__()
        if uses_noise_tokens:
            raise ValueError(
                "model (ar_transformer): the AR baseline takes no diffusion noise tokens; "
                "remove the process/schedule/parameterization sections for an AR recipe"
            )
        dim, num_blocks, num_heads = cfg.dims()
        self.cfg, self.vocab_size, self.uses_noise_tokens = cfg, vocab_size, False
        self.hidden_size, self.num_blocks = dim, num_blocks
        self.embedding = TokenEmbedding(vocab_size, dim)
        self.positions = LearnedPositions(cfg.learned_positions, dim) if cfg.learned_positions else None
        self.blocks = nn.ModuleList(
            ARBlock(dim, num_heads, cfg.mlp_ratio, cfg.dropout, cfg.attn_backend) for _ in range(num_blocks)
        )
        self.norm = LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x_BL: torch.Tensor, doc_ids_BL: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token logits ``[B, L, V]``: position ``l`` sees ``x[:, :l+1]`` (and only its own document)."""
        h_BLD = self.embedding(x_BL)
        if self.positions is not None:
            h_BLD = self.positions(h_BLD)
        for block in self.blocks:
            h_BLD = block(h_BLD, doc_ids_BL)
        return self.head(self.norm(h_BLD))

    @torch.no_grad()
    def score(self, x_BL: torch.Tensor, doc_ids_BL: torch.Tensor | None = None) -> torch.Tensor:
        """Per-token NLL ``[B, L-1]`` (fp32) of ``x[:, 1:]`` given the prefix: ``-log p(x_{l+1} | x_{<=l})``."""
        logits_BLV = self.forward(x_BL, doc_ids_BL)[:, :-1].float()
        return F.cross_entropy(logits_BLV.transpose(1, 2), x_BL[:, 1:], reduction="none")

    def check_seq_len(self, seq_len: int) -> None:
        """Raise ``ValueError`` if the model cannot take ``seq_len`` tokens (a too short position table)."""
        if self.positions is not None:
            self.positions.check_length(seq_len, "model (ar_transformer)")

    def num_flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token ``6 N_matmul + 12 num_blocks D seq_len`` (``udmtrain.models.flops``)."""
        return transformer_flops_per_token(self, seq_len)
