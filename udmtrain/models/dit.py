"""DiT backbone ("DDiT", MDLM/DUO style) for every diffusion process (docs/theory.md §6 and 4).

``DiT(cfg, vocab_size, uses_noise_tokens)``: ``forward(xt_BL, sigma_B, noise_BL=None, doc_ids_BL=None)
-> logits_BLV`` with ``V = vocab_size = process.num_states`` (input and output width).

* input ``h_BLD = Emb(z)`` (kaiming-uniform table, no absolute positions); for AUDM
  (``uses_noise_tokens``) ``h = W_in[Emb(z); Emb_c(n); 1[z=n]]`` (see ``NoiseConditioner``); with
  ``learned_positions: N > 0`` a learned table adds ``P_l`` to position ``l`` (``LearnedPositions``);
* ``c_BC = SiLU(MLP(sinusoid(sigma)))`` (sigma zeroed when ``time_conditioning`` is False);
* blocks: pre-LN adaLN-Zero, ``x += gate * Dropout(f(modulate(LN(x), shift, scale)))`` for
  ``f`` = bidirectional RoPE attention and the GELU MLP; ``adaLN: Linear(C -> 6D)`` zero-init, so
  every block is the identity at initialisation;
* head: ``Linear(D -> V)(modulate(LN(x), adaLN_final(c)))`` with zero-init head -> uniform logits.

Precision: the caller's autocast (bf16) covers the Linear layers; norms, rotary and the time
embedding are fp32 islands and the residual stream stays fp32. The returned logits are in the
autocast dtype (bf16) under autocast: the objective / parameterization upcasts to fp32 before any
log-softmax (docs/theory.md §0 "Precision", docs/theory.md §10.6).

Shape legend: B batch, L length, D hidden, C cond_dim, V vocab_size (= process.num_states).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from udmtrain.models.attention import SelfAttention
from udmtrain.models.flops import transformer_flops_per_token
from udmtrain.models.layers import (
    MLP,
    LayerNorm,
    LearnedPositions,
    TimestepEmbedder,
    TokenEmbedding,
    modulate,
    resolve_size,
)
from udmtrain.registry import MODEL


class NoiseConditioner(nn.Module):
    """AUDM input fusion of the noisy token ``z``, the noise token ``n`` and the match bit ``m = 1[z = n]``.

    * ``separate_linear``: ``h = Linear(2D+1 -> D)([Emb(z); Emb_c(n); m])`` with a second V x D table
      ``Emb_c`` (+ V D + (2D+1) D + D parameters; docs/theory.md §4);
    * ``shared_mlp``: ``Emb_c = Emb`` and ``W_in = Linear(2D+1 -> 4D) -> GELU(tanh) -> Linear(4D -> D)``
      (+ (2D+1) 4D + 4D + 4D D + D parameters);
    * ``shared_embedding`` (parameter-matched with MDLM/UDLM up to 2D scalars):
      ``h = Emb(z) + (1 - m) * g * Emb(n) + m * u`` with learned vectors ``g, u`` in R^D, both zero-init
      so training starts from the unconditioned network. ``u`` plays the role of MDLM's mask
      embedding (flags active positions); ``g * Emb(n)`` tells inactive (surely clean) positions
      which noise token they would carry, through the shared table.
    """

    def __init__(self, mode: str, vocab_size: int, dim: int) -> None:
        super().__init__()
        self.mode = mode
        if mode == "separate_linear":
            self.noise_embedding = TokenEmbedding(vocab_size, dim)
            self.fuse = nn.Linear(2 * dim + 1, dim)
        elif mode == "shared_mlp":
            self.fuse = nn.Sequential(
                nn.Linear(2 * dim + 1, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim)
            )
        elif mode == "shared_embedding":
            self.noise_gate = nn.Parameter(torch.zeros(dim))
            self.match_vector = nn.Parameter(torch.zeros(dim))
        else:
            raise ValueError(f"NoiseConditioner: unknown noise_conditioning {mode!r}")
        # the mode is resolved once here, not compared as a string on every forward
        self.additive = mode == "shared_embedding"
        self.own_table = mode == "separate_linear"

    def forward(
        self, emb_z_BLD: torch.Tensor, embedding: TokenEmbedding, xt_BL: torch.Tensor, noise_BL: torch.Tensor
    ) -> torch.Tensor:
        """``Emb(z)`` [B, L, D], the shared table and the ids -> fused input [B, L, D] (``Emb(z)``'s dtype,
        so the residual stream stays fp32 under autocast)."""
        match_BL1 = (xt_BL == noise_BL).unsqueeze(-1).to(emb_z_BLD.dtype)
        if self.additive:
            emb_n_BLD = embedding(noise_BL)
            return emb_z_BLD + (1 - match_BL1) * self.noise_gate * emb_n_BLD + match_BL1 * self.match_vector
        table = self.noise_embedding if self.own_table else embedding
        return self.fuse(torch.cat([emb_z_BLD, table(noise_BL), match_BL1], dim=-1)).to(emb_z_BLD.dtype)


class DiTBlock(nn.Module):
    """Pre-LN adaLN-Zero transformer block (bidirectional attention); identity at init."""

    def __init__(self, dim: int, num_heads: int, cond_dim: int, mlp_ratio: int, dropout: float, attn_backend: str):
        super().__init__()
        self.norm1, self.norm2 = LayerNorm(dim), LayerNorm(dim)
        self.attn = SelfAttention(dim, num_heads, causal=False, attn_backend=attn_backend)
        self.mlp = MLP(dim, mlp_ratio)
        self.dropout = nn.Dropout(dropout)
        self.adaLN = nn.Linear(cond_dim, 6 * dim)
        nn.init.zeros_(self.adaLN.weight)
        nn.init.zeros_(self.adaLN.bias)

    def forward(self, x_BLD: torch.Tensor, c_BC: torch.Tensor, doc_ids_BL: torch.Tensor | None) -> torch.Tensor:
        """``x + g_a Drop(Attn(mod(LN x))) ``, then ``+ g_m Drop(MLP(mod(LN x)))``; [B, L, D] -> [B, L, D]."""
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN(c_BC)[:, None, :].chunk(6, dim=-1)
        # addcmul: the gated residual update in one pass (the same x + gate * f, fused)
        x_BLD = torch.addcmul(x_BLD, gate_a, self.dropout(self.attn(modulate(self.norm1(x_BLD), shift_a, scale_a),
                                                                    doc_ids_BL)))
        return torch.addcmul(x_BLD, gate_m, self.dropout(self.mlp(modulate(self.norm2(x_BLD), shift_m, scale_m))))


class FinalLayer(nn.Module):
    """``Linear(D -> V)(mod(LN x, adaLN(c)))`` with zero-init adaLN and head (uniform initial logits)."""

    def __init__(self, dim: int, cond_dim: int, vocab_size: int) -> None:
        super().__init__()
        self.norm = LayerNorm(dim)
        self.adaLN = nn.Linear(cond_dim, 2 * dim)
        self.linear = nn.Linear(dim, vocab_size)
        for layer in (self.adaLN, self.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x_BLD: torch.Tensor, c_BC: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN(c_BC)[:, None, :].chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x_BLD), shift, scale))


@MODEL.register("dit")
class DiT(nn.Module):
    """Diffusion transformer: ``(xt_BL, sigma_B[, noise_BL, doc_ids_BL]) -> logits_BLV``."""

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
        cond_dim: int = 128
        """Width C of the time conditioning vector fed to every adaLN."""
        mlp_ratio: int = 4
        """MLP hidden width = mlp_ratio * D."""
        dropout: float = 0.1
        """Dropout on each residual branch (none inside attention)."""
        attn_backend: Literal["auto", "flash", "sdpa"] = "auto"
        """Attention kernel: auto (flash if on CUDA and installed, else sdpa; the reason is logged),
        flash (fails loudly if unavailable), sdpa."""
        noise_conditioning: Literal["none", "separate_linear", "shared_mlp", "shared_embedding"] = "none"
        """AUDM input fusion of the per-position noise token; must be set iff the process has noise tokens."""
        time_conditioning: bool = True
        """Feed sigma_t to the network; False feeds 0 (MDLM convention)."""
        learned_positions: int = 0
        """Length N of a learned absolute position table added to the input embedding, on top of RoPE:
        0 = none (the MDLM/DUO DiT); otherwise N >= data.seq_len. For fixed layouts (Sudoku's grid)."""

        def __post_init__(self) -> None:
            resolve_size("model (dit)", self.size, self.hidden_size, self.num_blocks, self.num_heads)
            if self.learned_positions < 0:
                raise ValueError(f"model (dit): learned_positions must be >= 0 (0 = none), got {self.learned_positions}")
            if self.cond_dim <= 0 or self.mlp_ratio <= 0:
                raise ValueError(
                    f"model (dit): cond_dim and mlp_ratio must be positive, got {self.cond_dim}, {self.mlp_ratio}"
                )
            if not 0.0 <= self.dropout < 1.0:
                raise ValueError(f"model (dit): dropout must be in [0, 1), got {self.dropout}")

        def dims(self) -> tuple[int, int, int]:
            """Resolved (hidden_size, num_blocks, num_heads)."""
            return resolve_size("model (dit)", self.size, self.hidden_size, self.num_blocks, self.num_heads)

    def __init__(self, cfg: Config, vocab_size: int, uses_noise_tokens: bool = False) -> None:
        super().__init__()
        if uses_noise_tokens and cfg.noise_conditioning == "none":
            raise ValueError(
                "model (dit): the process uses per-position noise tokens (absorbing_uniform), so "
                "model.noise_conditioning must be one of separate_linear, shared_mlp, shared_embedding "
                "(got 'none')"
            )
        if not uses_noise_tokens and cfg.noise_conditioning != "none":
            raise ValueError(
                f"model (dit): noise_conditioning={cfg.noise_conditioning!r} needs a process with noise "
                "tokens (absorbing_uniform); set model.noise_conditioning: none"
            )
        dim, num_blocks, num_heads = cfg.dims()
        self.cfg, self.vocab_size, self.uses_noise_tokens = cfg, vocab_size, uses_noise_tokens
        self.hidden_size, self.num_blocks = dim, num_blocks
        self.time_conditioning = bool(cfg.time_conditioning)
        """Whether the output depends on ``sigma_B`` (samplers read it: ``build_sampler``)."""
        self.embedding = TokenEmbedding(vocab_size, dim)
        self.positions = LearnedPositions(cfg.learned_positions, dim) if cfg.learned_positions else None
        self.noise_conditioner = (
            NoiseConditioner(cfg.noise_conditioning, vocab_size, dim) if uses_noise_tokens else None
        )
        self.time_embedding = TimestepEmbedder(cfg.cond_dim)
        self.blocks = nn.ModuleList(
            DiTBlock(dim, num_heads, cfg.cond_dim, cfg.mlp_ratio, cfg.dropout, cfg.attn_backend)
            for _ in range(num_blocks)
        )
        self.final = FinalLayer(dim, cfg.cond_dim, vocab_size)

    def forward(
        self,
        xt_BL: torch.Tensor,
        sigma_B: torch.Tensor,
        noise_BL: torch.Tensor | None = None,
        doc_ids_BL: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits ``[B, L, V]`` (autocast dtype under autocast) of the network's prediction object.

        ``sigma_B`` = ``-log alpha_t`` per sample; ``noise_BL`` required iff ``uses_noise_tokens``;
        ``doc_ids_BL`` restricts attention to each token's own document.
        """
        if (noise_BL is not None) != self.uses_noise_tokens:
            raise ValueError(
                "DiT.forward: noise_BL is required exactly when the model was built with uses_noise_tokens=True "
                f"(built with {self.uses_noise_tokens}, noise_BL {'given' if noise_BL is not None else 'None'})"
            )
        h_BLD = self.embedding(xt_BL)
        if self.noise_conditioner is not None:
            h_BLD = self.noise_conditioner(h_BLD, self.embedding, xt_BL, noise_BL)
        if self.positions is not None:
            h_BLD = self.positions(h_BLD)
        if not self.time_conditioning:
            sigma_B = torch.zeros_like(sigma_B)
        c_BC = nn.functional.silu(self.time_embedding(sigma_B))
        for block in self.blocks:
            h_BLD = block(h_BLD, c_BC, doc_ids_BL)
        return self.final(h_BLD, c_BC)

    def check_seq_len(self, seq_len: int) -> None:
        """Raise ``ValueError`` if the model cannot take ``seq_len`` tokens (a too short position table)."""
        if self.positions is not None:
            self.positions.check_length(seq_len, "model (dit)")

    def num_flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token ``6 N_matmul + 12 num_blocks D seq_len`` (``udmtrain.models.flops``)."""
        return transformer_flops_per_token(self, seq_len)
