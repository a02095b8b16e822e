"""Attention backends (resolution, override, loud failures) and the SDPA path on CPU."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from udmtrain.models import attention as attn_mod
from udmtrain.models.attention import (
    ENV_OVERRIDE,
    SelfAttention,
    attention,
    doc_mask,
    flash_available,
    force_backend,
    resolve_backend,
)

FLASH_OK, FLASH_REASON = flash_available()


@pytest.fixture(autouse=True)
def _no_env_override(monkeypatch):
    monkeypatch.delenv(ENV_OVERRIDE, raising=False)


def _reference(q, k, v, allowed_BLL):
    """softmax(q k^T / sqrt K) v in float64 with a boolean [B, L, L] mask; q,k,v [B, L, H, K]."""
    scores = torch.einsum("bihk,bjhk->bhij", q.double(), k.double()) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~allowed_BLL[:, None], float("-inf"))
    return torch.einsum("bhij,bjhk->bihk", scores.softmax(-1), v.double())


def test_resolve_backend_cpu():
    assert resolve_backend("sdpa", "cpu") == ("sdpa", "attn=sdpa: requested by attn_backend")
    backend, reason = resolve_backend("auto", "cpu")
    assert backend == "sdpa" and reason == "attn=sdpa: device is cpu (flash_attn needs CUDA)"
    with pytest.raises(ValueError, match="'fast' is not one of"):
        resolve_backend("fast", "cpu")


@pytest.mark.skipif(FLASH_OK, reason="flash_attn is installed here")
def test_flash_requested_without_flash_attn_fails_loudly():
    assert FLASH_REASON.startswith("flash_attn not installed")
    with pytest.raises(ImportError, match=r"pip install 'udmtrain\[gpu\]'"):
        resolve_backend("flash", "cpu")
    with pytest.raises(ImportError, match=r"attn_backend: flash.*pip install 'udmtrain\[gpu\]'"):
        SelfAttention(16, 2, causal=False, attn_backend="flash")


@pytest.mark.skipif(not FLASH_OK, reason="flash_attn is not installed")
def test_flash_requested_on_cpu_fails_loudly():
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        resolve_backend("flash", "cpu")


def test_force_backend_and_env_override(monkeypatch):
    with force_backend("sdpa"):
        assert resolve_backend("flash", "cpu") == ("sdpa", "attn=sdpa: requested by force_backend()")
    monkeypatch.setenv(ENV_OVERRIDE, "sdpa")
    assert resolve_backend("flash", "cpu") == ("sdpa", f"attn=sdpa: requested by ${ENV_OVERRIDE}")
    monkeypatch.setenv(ENV_OVERRIDE, "turbo")
    with pytest.raises(ValueError, match=f"{ENV_OVERRIDE}='turbo'"):
        resolve_backend("auto", "cpu")
    with pytest.raises(ValueError, match="force_backend"):
        with force_backend("xformers"):
            pass


def test_selfattention_logs_reason_once(caplog):
    attn_mod._logged.clear()
    layer = SelfAttention(16, 2, causal=False, attn_backend="auto")
    with caplog.at_level(logging.INFO, logger="udmtrain.models.attention"):
        layer(torch.randn(1, 4, 16))
        layer(torch.randn(1, 4, 16))
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["attn=sdpa: device is cpu (flash_attn needs CUDA)"]
    assert layer.backend_reason == messages[0]


@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_matches_reference(causal):
    q, k, v = (torch.randn(2, 5, 3, 4) for _ in range(3))
    L = 5
    allowed = torch.ones(2, L, L, dtype=torch.bool)
    if causal:
        allowed = allowed & torch.ones(L, L, dtype=torch.bool).tril()
    out = attention(q, k, v, backend="sdpa", causal=causal)
    assert out.shape == (2, 5, 3, 4)
    torch.testing.assert_close(out.double(), _reference(q, k, v, allowed), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_doc_mask_matches_reference_and_isolates_documents(causal):
    doc = torch.tensor([[0, 0, 0, 1, 1, 2], [5, 5, 5, 5, 5, 5]])
    mask = doc_mask(doc, causal)
    assert mask.shape == (2, 1, 6, 6)
    q, k, v = (torch.randn(2, 6, 2, 4) for _ in range(3))
    out = attention(q, k, v, backend="sdpa", causal=causal, doc_ids_BL=doc)
    torch.testing.assert_close(out.double(), _reference(q, k, v, mask[:, 0]), atol=1e-5, rtol=1e-5)
    # a document's output does not depend on another document's keys/values
    k2, v2 = k.clone(), v.clone()
    k2[0, 3:], v2[0, 3:] = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    out2 = attention(q, k2, v2, backend="sdpa", causal=causal, doc_ids_BL=doc)
    torch.testing.assert_close(out2[0, :3], out[0, :3], atol=1e-6, rtol=0)
    assert not torch.allclose(out2[0, 3:], out[0, 3:])
    # a single document everywhere equals no mask
    full = attention(q, k, v, backend="sdpa", causal=causal)
    torch.testing.assert_close(out[1], full[1], atol=1e-6, rtol=1e-6)


def test_flash_backend_falls_back_for_fp32_and_doc_mask(caplog):
    """A resolved 'flash' never reaches flash_attn with fp32 inputs or a doc mask (logged, SDPA used)."""
    attn_mod._logged.clear()
    q, k, v = (torch.randn(1, 4, 2, 4) for _ in range(3))
    with caplog.at_level(logging.INFO, logger="udmtrain.models.attention"):
        out = attention(q, k, v, backend="flash", causal=True)
        out_doc = attention(q, k, v, backend="flash", causal=True, doc_ids_BL=torch.zeros(1, 4, dtype=torch.long))
    torch.testing.assert_close(out, attention(q, k, v, backend="sdpa", causal=True))
    torch.testing.assert_close(out_doc, out, atol=1e-6, rtol=1e-6)
    text = " | ".join(r.getMessage() for r in caplog.records)
    assert "flash needs bf16/fp16" in text and "document mask" in text
