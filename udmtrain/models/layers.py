"""Building blocks shared by the DiT and the AR transformer (docs/theory.md §6).

Precision: the caller runs the network under autocast (bf16 on GPU and CPU). Layer norms, the
rotary embedding and the timestep embedding are fp32 islands: they disable autocast and upcast,
because bf16 loses the small differences these operations depend on (variance, phase, sigma).

Shape legend: B batch, L sequence length, D hidden size, H heads, K head dim (D = H*K),
C conditioning width (cond_dim), F sinusoidal feature count.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# name -> (hidden_size, num_blocks, num_heads); docs/theory.md §6 "Sizes".
MODEL_SIZES: dict[str, tuple[int, int, int]] = {
    "tiny": (256, 8, 8),
    "small": (768, 12, 12),
    "medium": (1024, 24, 16),
}


def resolve_size(
    owner: str, size: str | None, hidden_size: int | None, num_blocks: int | None, num_heads: int | None
) -> tuple[int, int, int]:
    """(hidden_size, num_blocks, num_heads) from a size preset and/or explicit fields.

    Rule: with ``size`` set, each explicit field must be None or equal to the preset (a differing
    value is ambiguous and raises); without ``size`` all three fields are required. Also checks
    ``hidden_size % num_heads == 0`` and an even head dim (rotary rotates pairs).
    """
    fields = {"hidden_size": hidden_size, "num_blocks": num_blocks, "num_heads": num_heads}
    if size is not None:
        if size not in MODEL_SIZES:
            raise ValueError(f"{owner}: size={size!r} is not one of {sorted(MODEL_SIZES)}")
        preset = dict(zip(fields, MODEL_SIZES[size]))
        clash = [f"{k}={v} (preset {preset[k]})" for k, v in fields.items() if v is not None and v != preset[k]]
        if clash:
            raise ValueError(
                f"{owner}: size={size!r} fixes hidden_size/num_blocks/num_heads, but {', '.join(clash)} "
                f"differ; remove these fields or remove 'size' and set all three explicitly"
            )
        fields = preset
    else:
        missing = [k for k, v in fields.items() if v is None]
        if missing:
            raise ValueError(
                f"{owner}: without 'size' the fields {', '.join(missing)} are required "
                f"(or set size: one of {sorted(MODEL_SIZES)})"
            )
    d, n, h = fields["hidden_size"], fields["num_blocks"], fields["num_heads"]
    if min(d, n, h) <= 0:
        raise ValueError(f"{owner}: hidden_size, num_blocks, num_heads must be positive, got {d}, {n}, {h}")
    if d % h != 0 or (d // h) % 2 != 0:
        raise ValueError(
            f"{owner}: hidden_size={d} must be a multiple of num_heads={h} with an even head dim "
            f"(rotary rotates pairs); got head dim {d / h:g}"
        )
    return d, n, h


def _no_autocast(device: torch.device):
    """Context manager disabling autocast on ``device`` (CPU and CUDA autocast are separate)."""
    return torch.autocast(device_type=device.type, enabled=False)


class LayerNorm(nn.Module):
    """fp32 LayerNorm without bias, learnable scale only: ``y = (x - mean)/sqrt(var + eps) * w``.

    Computed in fp32 whatever the input; returned in the input's dtype, i.e. fp32 for the usual
    fp32 residual stream under autocast, bf16 when the engine casts the whole model to bf16 (then
    the next Linear has bf16 weights and no autocast to reconcile dtypes).
    """

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x_BLD: torch.Tensor) -> torch.Tensor:
        with _no_autocast(x_BLD.device):
            y = F.layer_norm(x_BLD.float(), (self.dim,), self.weight.float(), None, self.eps)
        return y.to(x_BLD.dtype)


def modulate(x_BLD: torch.Tensor, shift_B1D: torch.Tensor, scale_B1D: torch.Tensor) -> torch.Tensor:
    """adaLN modulation ``x (1 + scale) + shift`` (broadcast over positions), one fused ``addcmul``
    pass over ``[B, L, D]`` instead of a multiply and an add."""
    return torch.addcmul(shift_B1D, x_BLD, 1 + scale_B1D)


def timestep_features(sigma_B: torch.Tensor, dim: int = 256, max_period: float = 1e4) -> torch.Tensor:
    """Sinusoidal features ``[cos(sigma w_k), sin(sigma w_k)]``, ``w_k = max_period^(-k/(dim/2))``.

    ``sigma_B`` float [B] -> [B, dim] float32 (an odd ``dim`` gets one zero column).
    """
    half = dim // 2
    freqs_F = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=sigma_B.device) / half
    )
    args_BF = sigma_B.float()[:, None] * freqs_F[None, :]
    emb = torch.cat([torch.cos(args_BF), torch.sin(args_BF)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """sigma_B -> Linear(F->C) -> SiLU -> Linear(C->C) (docs/theory.md §6; the caller applies the final SiLU).

    Computed in fp32 (weights upcast), returned in the parameters' dtype (fp32 unless the engine
    cast the model to bf16).
    """

    def __init__(self, cond_dim: int, num_features: int = 256, max_period: float = 1e4) -> None:
        super().__init__()
        self.num_features, self.max_period = num_features, max_period
        self.mlp = nn.Sequential(nn.Linear(num_features, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))

    def forward(self, sigma_B: torch.Tensor) -> torch.Tensor:
        """[B] -> [B, C]."""
        first, last = self.mlp[0], self.mlp[2]
        with _no_autocast(sigma_B.device):
            h_BC = timestep_features(sigma_B, self.num_features, self.max_period)
            h_BC = F.silu(F.linear(h_BC, first.weight.float(), first.bias.float()))
            h_BC = F.linear(h_BC, last.weight.float(), last.bias.float())
        return h_BC.to(first.weight.dtype)


class Rotary(nn.Module):
    """Rotary position embedding, rotate-half convention, base 1e4, over the full head dim.

    ``cos_LK, sin_LK`` (fp32) are cached per (length, device); ``apply`` rotates q or k:
    ``x' = x cos + rotate_half(x) sin`` with ``rotate_half([a, b]) = [-b, a]``, computed in fp32
    and cast back to the input dtype.
    """

    def __init__(self, head_dim: int, base: float = 1e4) -> None:
        super().__init__()
        self.head_dim, self.base = head_dim, base
        self._cache: tuple[int, torch.device, torch.Tensor, torch.Tensor] | None = None

    def cos_sin(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 ``cos_LK, sin_LK`` for positions 0..seq_len-1 (frequency k repeated in both halves)."""
        if self._cache is None or self._cache[0] < seq_len or self._cache[1] != device:
            exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device) / self.head_dim
            inv_freq = 1.0 / self.base**exponents
            angles_LK2 = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
            angles_LK = torch.cat([angles_LK2, angles_LK2], dim=-1)
            self._cache = (seq_len, device, angles_LK.cos(), angles_LK.sin())
        return self._cache[2][:seq_len], self._cache[3][:seq_len]

    @staticmethod
    def rotate(x_BLHK: torch.Tensor, cos_LK: torch.Tensor, sin_LK: torch.Tensor) -> torch.Tensor:
        """Rotate ``x_BLHK`` by position (fp32 math, result in ``x``'s dtype).

        ``x cos + rotate_half(x) sin`` without materialising ``rotate_half(x)`` (no ``neg``/``cat``
        copies): the halves of ``x cos`` are updated in place, ``-= x_2 sin_1`` and ``+= x_1 sin_2``.
        """
        with _no_autocast(x_BLHK.device):
            x = x_BLHK.float()
            half = x.shape[-1] // 2
            cos, sin = cos_LK[None, :, None, :], sin_LK[None, :, None, :]
            out = x * cos
            out[..., :half].addcmul_(x[..., half:], sin[..., :half], value=-1.0)
            out[..., half:].addcmul_(x[..., :half], sin[..., half:])
            return out.to(x_BLHK.dtype)


class MLP(nn.Module):
    """``Linear(D -> r D) -> GELU(tanh) -> Linear(r D -> D)``, both with biases."""

    def __init__(self, dim: int, mlp_ratio: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, mlp_ratio * dim)
        self.fc2 = nn.Linear(mlp_ratio * dim, dim)

    def forward(self, x_BLD: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x_BLD), approximate="tanh"))


class TokenEmbedding(nn.Module):
    """Learned ``V x D`` table, kaiming-uniform (a = sqrt 5) init, no absolute positions."""

    def __init__(self, vocab_size: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, dim))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, ids_BL: torch.Tensor) -> torch.Tensor:
        """LongTensor [B, L] -> [B, L, D] in the parameter dtype (fp32 residual stream)."""
        return F.embedding(ids_BL, self.weight)


class LearnedPositions(nn.Module):
    """A learned absolute position table ``P`` [N, D] added to the input: ``h_l <- h_l + P_l``.

    Optional on top of RoPE (which only sees relative offsets). Tasks with a fixed layout, such as
    Sudoku's 81 cells in a row-major 9 x 9 grid, need to know *which* cell a position is (its row,
    column and box); a table lets attention learn those relations directly. Initialised N(0, 0.02^2)
    (GPT-2's convention), small next to the token embedding.
    """

    def __init__(self, max_positions: int, dim: int) -> None:
        super().__init__()
        self.max_positions = max_positions
        self.weight = nn.Parameter(torch.empty(max_positions, dim))
        nn.init.normal_(self.weight, std=0.02)

    def check_length(self, seq_len: int, owner: str) -> None:
        """Raise ``ValueError`` when ``seq_len`` positions do not fit the table."""
        if seq_len > self.max_positions:
            raise ValueError(f"{owner}: sequences of {seq_len} tokens need model.learned_positions >= {seq_len} "
                             f"(it is {self.max_positions}); raise it or set it to 0 (RoPE only)")

    def forward(self, h_BLD: torch.Tensor) -> torch.Tensor:
        """[B, L, D] -> [B, L, D] (``h``'s dtype); ``L <= max_positions``."""
        self.check_length(h_BLD.shape[1], "LearnedPositions")
        return h_BLD + self.weight[: h_BLD.shape[1]].to(h_BLD.dtype)

