"""The position-sliced, checkpointed loss path equals the reference (unsliced) one: values, NELBO sums and
the gradients with respect to the logits, for every valid (process, parameterization, loss) triple, with
fp32 and bf16 logits; and it keeps fewer float32 [B, L, V] tensors alive for the backward pass."""

from __future__ import annotations

import pytest
import torch

from udmtrain.diffusion.objective import DiffusionObjective, chunked_per_token
from udmtrain.diffusion.process import Noised
from udmtrain.diffusion.time_sampling import antithetic_times
from udmtrain.registry import LOSS, PARAMETERIZATION, PROCESS, SCHEDULE

V, B, L = 7, 3, 10
TRIPLES = [(p, z, l) for p in ("masked", "uniform", "absorbing_uniform") for z in ("denoiser", "loo")
           for l in ("plugin_nelbo", "max_coupling_nelbo", "mdlm_nelbo", "audm_nelbo", "cross_entropy")
           if p in PARAMETERIZATION.requirements(z).get("process", {p}) and p in LOSS.requirements(l).get("process", {p})]


def _objective(proc_name, param_name, loss_name, chunk_elements):
    proc = PROCESS.build(proc_name, vocab_size=V)
    return DiffusionObjective(SCHEDULE.build("loglinear"), proc, PARAMETERIZATION.build(param_name, process=proc),
                              LOSS.build(loss_name, process=proc), chunk_elements=chunk_elements), proc


def _run(obj, proc, dtype, chunk_elements):
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(B, L, proc.num_states, generator=gen) * 3
    logits = base.to(dtype).requires_grad_(True)
    x0 = torch.randint(0, V, (B, L), generator=gen)
    valid = torch.ones(B, L, dtype=torch.bool)
    valid[0, 7:] = False
    obj.chunk_elements = chunk_elements
    out = obj(lambda *a, **k: logits, x0, valid, antithetic_times(B, 0, 1), torch.Generator().manual_seed(1))
    out.loss.backward()
    return out, logits.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("proc_name,param_name,loss_name", TRIPLES)
def test_sliced_loss_equals_reference(proc_name, param_name, loss_name, dtype):
    obj, proc = _objective(proc_name, param_name, loss_name, 1 << 30)
    ref, ref_grad = _run(obj, proc, dtype, 1 << 30)  # unsliced reference
    got, got_grad = _run(obj, proc, dtype, 1)  # one position per slice, checkpointed
    assert torch.isfinite(ref.loss)
    torch.testing.assert_close(got.loss, ref.loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(got.nelbo_sum, ref.nelbo_sum, rtol=1e-6, atol=0)
    assert torch.equal(got.num_tokens, ref.num_tokens)
    assert got_grad.dtype == dtype
    torch.testing.assert_close(got_grad.float(), ref_grad.float(), rtol=1e-5, atol=1e-7)


def test_chunked_per_token_matches_per_position_and_no_grad():
    obj, proc = _objective("uniform", "loo", "plugin_nelbo", 1 << 30)
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(B, L, V, generator=gen, dtype=torch.float64)
    x0, xt = torch.randint(0, V, (B, L), generator=gen), torch.randint(0, V, (B, L), generator=gen)
    alpha = torch.rand(B, 1, generator=gen, dtype=torch.float64) * 0.9 + 0.05
    dalpha = torch.full_like(alpha, -0.999)
    ref = obj.loss.per_token(obj.parameterization, logits, x0, Noised(xt), alpha, dalpha)
    for slice_elements in (1, B * V * 3, B * V * L):  # 1 position, 3 positions (ragged last slice), all
        got = chunked_per_token(obj.loss.per_token, obj.parameterization, logits, x0, Noised(xt), alpha, dalpha,
                                slice_elements=slice_elements)
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)  # same math; reductions may vectorise differently


def _saved_fp32_BLV(obj, proc, chunk_elements) -> int:
    """Number of float32 tensors with B*L*V entries that autograd saves for the backward pass."""
    count = 0

    def pack(t):
        nonlocal count
        if t.dtype == torch.float32 and t.numel() >= B * L * proc.num_states:
            count += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _run(obj, proc, torch.bfloat16, chunk_elements)
    return count


@pytest.mark.parametrize("proc_name,param_name,loss_name", [("uniform", "loo", "plugin_nelbo"),
                                                            ("masked", "denoiser", "mdlm_nelbo"),
                                                            ("absorbing_uniform", "denoiser", "audm_nelbo")])
def test_sliced_path_saves_no_fp32_full_size_tensor(proc_name, param_name, loss_name):
    obj, proc = _objective(proc_name, param_name, loss_name, 1 << 30)
    assert _saved_fp32_BLV(obj, proc, 1 << 30) >= 1  # the reference keeps full-size float32 intermediates
    assert _saved_fp32_BLV(obj, proc, 1) == 0  # the sliced path keeps only the (bf16) logits
