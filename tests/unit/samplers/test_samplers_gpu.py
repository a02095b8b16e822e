"""GPU checks of the samplers: CUDA generator and tensors end to end, exactness on the device, and a
GPT-2-sized vocabulary (float64 Gumbel over [B, L, 50257]) with a real module as the network."""

from __future__ import annotations

import pytest
import torch
from sampler_helpers import L, V, build, chi2, chi2_quantile, histogram, law, network

from udmtrain.registry import SAMPLER

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

COMBOS = [
    ("ancestral", "masked", "denoiser", {}), ("ancestral", "uniform", "loo", {}),
    ("ancestral", "uniform", "denoiser", {}), ("ancestral", "absorbing_uniform", "denoiser", {}),
    ("max_coupling", "uniform", "denoiser", {}), ("remdm", "masked", "denoiser", {}),
    ("reaudm", "absorbing_uniform", "denoiser", {}), ("pc_gibbs", "uniform", "loo", {}),
    ("pc_gibbs", "absorbing_uniform", "denoiser", {}), ("confidence", "uniform", "loo", {}),
]


def _oracle(process, data, kind=None):
    """The CPU oracle behind a device boundary: inputs to CPU, logits back to CUDA."""
    net = network(process, data, kind)

    def call(xt_BL, sigma_B, noise_BL=None):
        out = net(xt_BL.cpu(), sigma_B.cpu(), None if noise_BL is None else noise_BL.cpu())
        return out.to(xt_BL.device)

    return call


def _gen(seed):
    return torch.Generator(device="cuda").manual_seed(seed)


@pytest.mark.parametrize("combo", COMBOS, ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in COMBOS])
def test_cuda_end_to_end_and_reproducible(combo):
    name, process, param, cfg = combo
    smp = build(name, process, param, num_steps=16, **cfg)
    kind = "loo" if param == "loo" else None
    net = _oracle(process, law(0), kind)
    prefix = torch.zeros(256, L, dtype=torch.long, device="cuda")
    a = smp.sample(net, 256, L, _gen(1), prefix_BL=prefix, prefix_len=1)
    b = smp.sample(net, 256, L, _gen(1), prefix_BL=prefix, prefix_len=1)
    assert a.tokens_BL.is_cuda and a.nfe == 16
    assert torch.equal(a.tokens_BL, b.tokens_BL) and bool((a.tokens_BL[:, 0] == 0).all())


@pytest.mark.parametrize("name,process,param,kind", [("ancestral", "masked", "denoiser", None),
                                                     ("ancestral", "uniform", "loo", "loo"),
                                                     ("reaudm", "absorbing_uniform", "denoiser", None)])
def test_cuda_exact_posterior_reproduces_law(name, process, param, kind):
    data = law(0)
    out = build(name, process, param, num_steps=128).sample(_oracle(process, data, kind), 4000, L, _gen(3))
    assert chi2(histogram(out.tokens_BL), data) < chi2_quantile(V**L - 1)


class _RandomNet(torch.nn.Module):
    """A real module with a bf16 head: logits from embeddings of (z, n) and sigma."""

    def __init__(self, num_states, dim=64):
        super().__init__()
        self.emb = torch.nn.Embedding(num_states, dim)
        self.head = torch.nn.Linear(dim, num_states)

    def forward(self, xt_BL, sigma_B, noise_BL=None):
        h = self.emb(xt_BL) + sigma_B[:, None, None]
        if noise_BL is not None:
            h = h + self.emb(noise_BL)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return 4.0 * self.head(h)


@pytest.mark.parametrize("name,process,param,cfg", [
    ("ancestral", "uniform", "loo", {"top_p": 0.9, "temperature": 0.8}),
    ("ancestral", "uniform", "denoiser", {"temperature_on": "logits", "temperature": 0.9}),
    ("ancestral", "masked", "denoiser", {"top_p": 0.9}), ("remdm", "masked", "denoiser", {}),
    ("ancestral", "absorbing_uniform", "denoiser", {}), ("reaudm", "absorbing_uniform", "denoiser", {}),
    ("pc_gibbs", "uniform", "loo", {}), ("pc_gibbs", "absorbing_uniform", "denoiser", {}),
    ("max_coupling", "uniform", "denoiser", {}), ("confidence", "masked", "denoiser", {}),
])
def test_gpt2_sized_vocabulary(name, process, param, cfg):
    vocab = 50257
    cls = SAMPLER.get(name)
    from udmtrain.registry import PARAMETERIZATION, PROCESS, SCHEDULE
    proc = PROCESS.build(process, None, vocab_size=vocab)
    smp = cls(cls.Config(num_steps=8, **cfg), schedule=SCHEDULE.build("loglinear"), process=proc,
              parameterization=PARAMETERIZATION.build(param, None, process=proc))
    net = _RandomNet(proc.num_states).cuda()
    torch.cuda.reset_peak_memory_stats()
    out = smp.sample(net, 4, 128, _gen(0))
    assert out.tokens_BL.is_cuda and out.nfe == 8
    assert int(out.tokens_BL.min()) >= 0 and int(out.tokens_BL.max()) < vocab
    peak = torch.cuda.max_memory_allocated() / 2**30
    print(f"{name}/{process}/{param}: peak {peak:.2f} GiB")
    assert peak < 8.0  # [4, 128, 50257] float64 is 0.19 GiB; a handful of such copies at most
