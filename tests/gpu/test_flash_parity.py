"""flash-attn vs SDPA parity on CUDA in bf16 (forward and backward), bidirectional and causal.

Skipped with the probe's reason when CUDA or flash_attn is absent (docs/design.md C15/C16). Run with
``pytest -m gpu tests/gpu``.
"""

from __future__ import annotations

import pytest
import torch

from udmtrain.models.ar import ARTransformer
from udmtrain.models.attention import attention, flash_available, force_backend, resolve_backend
from udmtrain.models.dit import DiT

FLASH_OK, FLASH_REASON = flash_available()
CUDA_OK = torch.cuda.is_available()

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not CUDA_OK, reason="CUDA is not available"),
]
needs_flash = pytest.mark.skipif(not FLASH_OK, reason=FLASH_REASON)
TOL = 2e-2


def _grads(fn, *tensors):
    out = fn(*tensors)
    out.float().square().mean().backward()
    return out.detach(), [t.grad.detach().clone() for t in tensors]


@needs_flash
@pytest.mark.parametrize("causal", [False, True])
def test_kernel_parity_bf16(causal):
    g = torch.Generator(device="cuda").manual_seed(0)
    shape = (2, 256, 8, 64)
    base = [torch.randn(shape, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(3)]

    def run(backend):
        q, k, v = (t.clone().requires_grad_(True) for t in base)
        return _grads(lambda a, b, c: attention(a, b, c, backend=backend, causal=causal), q, k, v)

    out_f, grads_f = run("flash")
    out_s, grads_s = run("sdpa")
    torch.testing.assert_close(out_f.float(), out_s.float(), atol=TOL, rtol=TOL)
    for gf, gs in zip(grads_f, grads_s):
        torch.testing.assert_close(gf.float(), gs.float(), atol=TOL, rtol=TOL)


@needs_flash
@pytest.mark.parametrize("kind", ["dit", "ar"])
def test_model_parity_bf16_autocast(kind):
    torch.manual_seed(0)
    if kind == "dit":
        net = DiT(DiT.Config(hidden_size=128, num_blocks=2, num_heads=4, dropout=0.0), 100).cuda()
    else:
        net = ARTransformer(ARTransformer.Config(hidden_size=128, num_blocks=2, num_heads=4, dropout=0.0), 100).cuda()
    with torch.no_grad():  # undo the zero-inits so that every path carries signal
        for p in net.parameters():
            if torch.count_nonzero(p) == 0:
                p.normal_(0, 0.05)
    x = torch.randint(0, 100, (2, 128), device="cuda")
    sigma = torch.rand(2, device="cuda")

    def run(backend):
        net.zero_grad(set_to_none=True)
        with force_backend(backend), torch.autocast("cuda", dtype=torch.bfloat16):
            assert net.blocks[0].attn.backend_for(x.device) == backend
            out = net(x, sigma) if kind == "dit" else net(x)
        out.float().logsumexp(-1).mean().backward()
        return out.float().detach(), [p.grad.float().clone() for p in net.parameters()]

    out_f, grads_f = run("flash")
    out_s, grads_s = run("sdpa")
    torch.testing.assert_close(out_f, out_s, atol=TOL, rtol=TOL)
    for gf, gs in zip(grads_f, grads_s):
        torch.testing.assert_close(gf, gs, atol=TOL, rtol=TOL)


def test_auto_backend_on_cuda_runs_bf16():
    """Without flash_attn the auto choice is sdpa with a reason; with it, flash. Both run bf16 fwd/bwd."""
    backend, reason = resolve_backend("auto", "cuda")
    assert backend == ("flash" if FLASH_OK and torch.cuda.get_device_capability()[0] >= 8 else "sdpa"), reason
    net = DiT(DiT.Config(hidden_size=64, num_blocks=2, num_heads=4), 50).cuda()
    x = torch.randint(0, 50, (2, 64), device="cuda")
    doc = torch.arange(64, device="cuda").div(20, rounding_mode="floor").expand(2, 64)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = net(x, torch.rand(2, device="cuda"), doc_ids_BL=doc)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())
