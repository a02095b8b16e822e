"""Parameter and FLOP counts from the layer shapes."""

from __future__ import annotations

import pytest
import torch

from udmtrain.models.ar import ARTransformer
from udmtrain.models.dit import DiT
from udmtrain.models.flops import flops_per_token, num_matmul_params, num_params


def test_dit_flops_formula_by_hand():
    cfg = DiT.Config(hidden_size=32, num_blocks=2, num_heads=4, cond_dim=16)
    net = DiT(cfg, 64)
    d, n, V, L = 32, 2, 64, 128
    n_matmul = n * (3 * d * d + d * d + 4 * d * d + 4 * d * d) + d * V  # qkv, out, mlp, head; no adaLN/time
    assert num_matmul_params(net) == n_matmul
    assert flops_per_token(net, L) == 6 * n_matmul + 12 * n * d * L
    assert net.num_flops_per_token(L) == flops_per_token(net, L)
    assert flops_per_token(cfg, L, vocab_size=64) == flops_per_token(net, L)


def test_audm_fusion_counts_and_ar():
    d = 32
    cfg = DiT.Config(hidden_size=d, num_blocks=2, num_heads=4, noise_conditioning="separate_linear")
    plain = DiT.Config(hidden_size=d, num_blocks=2, num_heads=4)
    extra = flops_per_token(cfg, 16, vocab_size=64, uses_noise_tokens=True) - flops_per_token(plain, 16, vocab_size=64)
    assert extra == 6 * (2 * d + 1) * d  # the fusion Linear runs per token; the second table is a lookup
    ar = ARTransformer(ARTransformer.Config(hidden_size=d, num_blocks=2, num_heads=4), 64)
    assert ar.num_flops_per_token(16) == 6 * (2 * 12 * d * d + d * 64) + 12 * 2 * d * 16


def test_num_params_excluding_embeddings():
    net = DiT(DiT.Config(hidden_size=32, num_blocks=1, num_heads=4), 64)
    assert num_params(net) - num_params(net, exclude_embeddings=True) == 64 * 32
    assert num_params(net) == sum(p.numel() for p in net.parameters())


def test_errors():
    with pytest.raises(TypeError, match="vocab_size= is required"):
        flops_per_token(DiT.Config(size="tiny"), 16)
    with pytest.raises(TypeError, match="has no num_flops_per_token"):
        flops_per_token(torch.nn.Linear(2, 2), 16)
    with pytest.raises(TypeError, match="not the Config of a registered model"):
        flops_per_token(DiT.Config, 16, vocab_size=4)
