"""Self-attention and its kernel choice; the ONLY module that imports ``flash_attn`` (docs/design.md C15).

Backends (``attn_backend`` in the model config):

* ``sdpa``  -- ``torch.nn.functional.scaled_dot_product_attention``; runs everywhere (CI path).
* ``flash`` -- flash-attn 2 (``flash_attn_func``); CUDA + bf16/fp16 only. Requested but not
  installed -> ImportError naming ``pip install 'udmtrain[gpu]'``; requested on a non-CUDA device ->
  RuntimeError. Never a silent fallback.
* ``auto``  -- flash when on CUDA (compute capability >= 8) and importable, else sdpa; the choice is
  logged with its reason (``attn=sdpa: flash_attn not installed (...)``).

Per-call fallbacks from a resolved ``flash`` to SDPA happen in two documented cases, each logged
once per reason: fp32 inputs (flash has no fp32 kernel: run under autocast) and a document mask
(``doc_ids_BL``), which udmtrain implements with an SDPA boolean mask rather than flash varlen.

Test override: ``force_backend("sdpa")`` (context manager) or the environment variable
``UDMTRAIN_ATTN_BACKEND`` replaces the *requested* backend everywhere; a forced ``flash`` still
fails loudly where flash cannot run.

Shape legend: B batch, L length, H heads, K head dim, D = H*K.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from udmtrain.models.layers import Rotary
from udmtrain.utils.optional import available, require

logger = logging.getLogger(__name__)

AttnBackend = Literal["auto", "flash", "sdpa"]
BACKENDS: tuple[str, ...] = ("auto", "flash", "sdpa")
ENV_OVERRIDE = "UDMTRAIN_ATTN_BACKEND"
_forced: str | None = None
_flash_probe: tuple[bool, str] | None = None
_logged: set[str] = set()


@contextlib.contextmanager
def force_backend(backend: str | None) -> Iterator[None]:
    """Within the block, every attention resolves ``backend`` instead of its configured request."""
    global _forced
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"force_backend: {backend!r} is not one of {BACKENDS}")
    previous, _forced = _forced, backend
    try:
        yield
    finally:
        _forced = previous


def flash_available() -> tuple[bool, str]:
    """(flash_attn importable, reason); probed once, lazily (nothing is imported at module load)."""
    global _flash_probe
    if _flash_probe is None:
        ok, why = available("flash_attn")
        _flash_probe = (ok, "flash_attn is installed" if ok else f"flash_attn not installed ({why})")
    return _flash_probe


def _log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        logger.info(message)


def effective_request(requested: str) -> tuple[str, str]:
    """The request after the test override: (backend request, where it came from)."""
    if _forced is not None:
        return _forced, "force_backend()"
    env = os.environ.get(ENV_OVERRIDE)
    if env:
        if env not in BACKENDS:
            raise ValueError(f"environment variable {ENV_OVERRIDE}={env!r} is not one of {BACKENDS}")
        return env, f"${ENV_OVERRIDE}"
    return requested, "attn_backend"


def resolve_backend(requested: str, device: torch.device | str) -> tuple[str, str]:
    """Choose the kernel for ``device``: returns (``"flash"`` | ``"sdpa"``, human-readable reason).

    Raises ValueError for an unknown name, ImportError (with the pip extra) for ``flash`` without
    flash_attn, RuntimeError for ``flash`` on a non-CUDA device.
    """
    device = torch.device(device)
    requested, source = effective_request(requested)
    if requested not in BACKENDS:
        raise ValueError(f"attn_backend={requested!r} is not one of {BACKENDS}")
    if requested == "sdpa":
        return "sdpa", f"attn=sdpa: requested by {source}"
    ok, why = flash_available()
    if requested == "flash":
        if not ok:
            require("flash_attn", extra="gpu", feature=f"attn_backend: flash (from {source})")
        if device.type != "cuda":
            raise RuntimeError(
                f"attn_backend: flash (from {source}) needs a CUDA device, but the model runs on "
                f"{device.type!r}; use attn_backend: sdpa or auto"
            )
        return "flash", f"attn=flash: requested by {source}"
    if device.type != "cuda":
        return "sdpa", f"attn=sdpa: device is {device.type} (flash_attn needs CUDA)"
    if not ok:
        return "sdpa", f"attn=sdpa: {why}"
    major, _ = torch.cuda.get_device_capability(device)
    if major < 8:
        return "sdpa", f"attn=sdpa: GPU compute capability {major}.x < 8.0 (flash-attn 2 needs Ampere+)"
    return "flash", "attn=flash: auto, CUDA device and flash_attn installed"


def doc_mask(doc_ids_BL: torch.Tensor, causal: bool) -> torch.Tensor:
    """Boolean ``[B, 1, L, L]`` mask, True = may attend: same document (and ``j <= i`` if causal)."""
    allowed_BLL = doc_ids_BL[:, :, None] == doc_ids_BL[:, None, :]
    if causal:
        L = doc_ids_BL.shape[1]
        allowed_BLL = allowed_BLL & torch.ones(L, L, dtype=torch.bool, device=doc_ids_BL.device).tril()
    return allowed_BLL[:, None]


def attention(
    q_BLHK: torch.Tensor,
    k_BLHK: torch.Tensor,
    v_BLHK: torch.Tensor,
    *,
    backend: str,
    causal: bool,
    doc_ids_BL: torch.Tensor | None = None,
) -> torch.Tensor:
    """``softmax(q k^T / sqrt(K) + mask) v`` per head, no dropout -> ``[B, L, H, K]``.

    ``backend`` is a *resolved* backend (``flash`` or ``sdpa``). The mask is bidirectional or
    causal, intersected with "same document" when ``doc_ids_BL`` is given (SDPA boolean mask).
    """
    if backend == "flash":
        if doc_ids_BL is not None:
            _log_once("attn: flash -> sdpa for this call: document mask (doc_ids) uses an SDPA boolean mask")
        elif q_BLHK.dtype not in (torch.bfloat16, torch.float16):
            _log_once(f"attn: flash -> sdpa for this call: inputs are {q_BLHK.dtype} (flash needs bf16/fp16)")
        else:
            import flash_attn  # owner module of this optional dependency (docs/design.md C15)

            return flash_attn.flash_attn_func(q_BLHK, k_BLHK, v_BLHK, dropout_p=0.0, causal=causal)
    q, k, v = (t.transpose(1, 2) for t in (q_BLHK, k_BLHK, v_BLHK))  # [B, H, L, K]
    if doc_ids_BL is not None:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=doc_mask(doc_ids_BL, causal))
    else:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return out.transpose(1, 2)


class SelfAttention(nn.Module):
    """Multi-head self-attention: QKV Linear(D -> 3D, no bias), RoPE on q and k, out Linear(D -> D, no bias).

    The kernel is resolved on the first forward per device (the model is usually built on CPU and
    moved by the engine), logged once with its reason and kept in ``self.backend_reason``.
    """

    def __init__(self, dim: int, num_heads: int, *, causal: bool, attn_backend: str = "auto") -> None:
        super().__init__()
        if attn_backend not in BACKENDS:
            raise ValueError(f"attn_backend={attn_backend!r} is not one of {BACKENDS}")
        if effective_request(attn_backend)[0] == "flash" and not flash_available()[0]:
            # Fail at build time, not at the first step.
            require("flash_attn", extra="gpu", feature="attn_backend: flash")
        self.num_heads, self.head_dim, self.causal = num_heads, dim // num_heads, causal
        self.attn_backend = attn_backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.rotary = Rotary(self.head_dim)
        self._resolved: dict[tuple[str, str | None, str], tuple[str, str]] = {}
        self.backend_reason: str | None = None

    def backend_for(self, device: torch.device) -> str:
        """Resolved backend for ``device`` (cached per device and override)."""
        key = (str(device), _forced, os.environ.get(ENV_OVERRIDE, ""))
        if key not in self._resolved:
            self._resolved[key] = resolve_backend(self.attn_backend, device)
            self.backend_reason = self._resolved[key][1]
            _log_once(self.backend_reason)
        return self._resolved[key][0]

    def forward(self, x_BLD: torch.Tensor, doc_ids_BL: torch.Tensor | None = None) -> torch.Tensor:
        """[B, L, D] -> [B, L, D]."""
        B, L, _ = x_BLD.shape
        q_BLHK, k_BLHK, v_BLHK = self.qkv(x_BLD).view(B, L, 3, self.num_heads, self.head_dim).unbind(dim=2)
        cos_LK, sin_LK = self.rotary.cos_sin(L, x_BLD.device)
        q_BLHK, k_BLHK = Rotary.rotate(q_BLHK, cos_LK, sin_LK), Rotary.rotate(k_BLHK, cos_LK, sin_LK)
        backend = self.backend_for(x_BLD.device)
        out_BLHK = attention(q_BLHK, k_BLHK, v_BLHK, backend=backend, causal=self.causal, doc_ids_BL=doc_ids_BL)
        return self.out(out_BLHK.reshape(B, L, -1))
