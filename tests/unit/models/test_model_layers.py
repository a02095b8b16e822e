"""fp32 islands and small layers: LayerNorm, rotary, timestep features, size presets."""

from __future__ import annotations

import math

import pytest
import torch

from udmtrain.models.layers import (
    LayerNorm,
    Rotary,
    TimestepEmbedder,
    TokenEmbedding,
    modulate,
    resolve_size,
    timestep_features,
)


def test_layernorm_has_no_bias_and_matches_formula():
    norm = LayerNorm(8)
    assert [n for n, _ in norm.named_parameters()] == ["weight"]
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, 8))
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    expected = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)
    expected = expected * norm.weight.double()
    y = norm(x.float())
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), expected, atol=1e-5, rtol=1e-5)


def test_layernorm_is_fp32_under_autocast_and_for_bf16_inputs():
    norm = LayerNorm(16)
    x = torch.randn(2, 4, 16) * 3 + 100.0  # a large mean: bf16 statistics would lose it
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = norm(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, torch.nn.functional.layer_norm(x, (16,)), atol=1e-5, rtol=1e-5)
    # bf16 input (engine casted model): computed in fp32, returned in bf16
    xb = x.bfloat16()
    yb = norm(xb)
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb.float(), torch.nn.functional.layer_norm(xb.float(), (16,)), atol=1e-2, rtol=1e-2)


def test_modulate():
    x, shift, scale = torch.randn(2, 3, 4), torch.randn(2, 1, 4), torch.randn(2, 1, 4)
    torch.testing.assert_close(modulate(x, shift, scale), x + x * scale + shift)


def test_timestep_features_formula():
    sigma = torch.tensor([0.0, 0.5, 7.0])
    feats = timestep_features(sigma, dim=8, max_period=1e4)
    assert feats.shape == (3, 8) and feats.dtype == torch.float32
    freqs = [math.exp(-math.log(1e4) * k / 4) for k in range(4)]
    for b, s in enumerate(sigma.tolist()):
        expected = [math.cos(s * f) for f in freqs] + [math.sin(s * f) for f in freqs]
        torch.testing.assert_close(feats[b], torch.tensor(expected), atol=1e-6, rtol=0)


def test_timestep_embedder_fp32_under_autocast():
    emb = TimestepEmbedder(cond_dim=16)
    sigma = torch.tensor([0.1, 3.0])
    ref = emb(sigma)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = emb(sigma)
    assert out.dtype == torch.float32
    assert torch.equal(out, ref)  # autocast disabled inside: bitwise identical


def _rotary_reference(x, base=1e4):
    """Rotate-half RoPE in float64 from its definition (pairs (i, i + K/2) rotated by pos * theta_i)."""
    B, L, H, K = x.shape
    half = K // 2
    theta = base ** (-torch.arange(half, dtype=torch.float64) * 2 / K)
    ang = torch.arange(L, dtype=torch.float64)[:, None] * theta[None]  # [L, half]
    a, b = x[..., :half].double(), x[..., half:].double()
    c, s = ang.cos()[None, :, None], ang.sin()[None, :, None]
    return torch.cat([a * c - b * s, b * c + a * s], dim=-1)


def test_rotary_matches_definition_and_is_fp32():
    rot = Rotary(head_dim=8)
    x = torch.randn(2, 6, 3, 8)
    cos, sin = rot.cos_sin(6, x.device)
    assert cos.dtype == torch.float32 and cos.shape == (6, 8)
    torch.testing.assert_close(Rotary.rotate(x, cos, sin).double(), _rotary_reference(x), atol=1e-5, rtol=1e-5)
    # bf16 input: math in fp32, result rounded once to bf16 (not accumulated bf16 error)
    xb = x.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yb = Rotary.rotate(xb, cos, sin)
    assert yb.dtype == torch.bfloat16
    assert torch.equal(yb, _rotary_reference(xb.float()).to(torch.bfloat16))


def test_rotary_scores_depend_only_on_relative_position():
    rot = Rotary(head_dim=4)
    cos, sin = rot.cos_sin(10, torch.device("cpu"))
    q, k = torch.randn(4), torch.randn(4)
    seq_q = q.expand(1, 10, 1, 4).contiguous()
    seq_k = k.expand(1, 10, 1, 4).contiguous()
    rq, rk = Rotary.rotate(seq_q, cos, sin)[0, :, 0], Rotary.rotate(seq_k, cos, sin)[0, :, 0]
    torch.testing.assert_close(rq[5] @ rk[2], rq[8] @ rk[5], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(rq[5] @ rk[2], rq[5] @ rk[4], atol=1e-3)


def test_token_embedding_kaiming_uniform_bound():
    emb = TokenEmbedding(1000, 64)
    bound = 1 / math.sqrt(64)  # kaiming_uniform(a=sqrt 5) on a [V, D] matrix: U(-1/sqrt(D), 1/sqrt(D))
    assert emb.weight.abs().max() <= bound
    assert emb.weight.abs().max() > 0.9 * bound


def test_resolve_size_rules():
    assert resolve_size("m", "small", None, None, None) == (768, 12, 12)
    assert resolve_size("m", "tiny", 256, None, 8) == (256, 8, 8)
    assert resolve_size("m", None, 32, 2, 4) == (32, 2, 4)
    with pytest.raises(ValueError, match=r"hidden_size=512 \(preset 768\)"):
        resolve_size("m", "small", 512, None, None)
    with pytest.raises(ValueError, match="num_blocks, num_heads are required"):
        resolve_size("m", None, 32, None, None)
    with pytest.raises(ValueError, match="multiple of num_heads"):
        resolve_size("m", None, 30, 2, 4)
    with pytest.raises(ValueError, match="even head dim"):
        resolve_size("m", None, 12, 2, 4)
    with pytest.raises(ValueError, match="size='huge'"):
        resolve_size("m", "huge", None, None, None)
