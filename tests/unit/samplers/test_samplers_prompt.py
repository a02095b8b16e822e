"""Prompt conditioning in every registered sampler: positions under a prompt mask (anywhere in the
sequence) never change, at any step, for every process the sampler accepts (tiny random network)."""

from __future__ import annotations

import pytest
import torch

from udmtrain.diffusion.samplers.base import unsupported_message
from udmtrain.registry import PARAMETERIZATION, PROCESS, SAMPLER, SCHEDULE

V, B, L = 5, 6, 12
ALL_PROCESSES = ("masked", "uniform", "absorbing_uniform")


class RandomNet(torch.nn.Module):
    """Seeded embedding -> mean-pooled mixing -> logits: every output depends on every input."""

    def __init__(self, num_states: int, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.emb = torch.nn.Parameter(torch.randn(num_states + V, 16, generator=gen))
        self.out = torch.nn.Parameter(torch.randn(32, num_states, generator=gen))
        self.calls = 0

    def forward(self, xt_BL, sigma_B, noise_BL=None):
        self.calls += 1
        h = self.emb[xt_BL]
        if noise_BL is not None:
            h = h + self.emb[self.emb.shape[0] - V + noise_BL]
        h = torch.cat([h, h.mean(1, keepdim=True).expand_as(h) * (1 + sigma_B[:, None, None])], -1)
        return 3.0 * torch.tanh(h) @ self.out


def combos():
    out = []
    for name in sorted(SAMPLER.names()):
        cls = SAMPLER.get(name)
        out.extend((name, process) for process in ALL_PROCESSES
                   if unsupported_message(cls, PROCESS.get(process), cls.required_capabilities(cls.Config())) is None)
    return out


def _prompt(seed: int = 4):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, L, generator=gen) < 0.5
    mask[:, 0] = True  # not a prefix: holes and a different pattern per row
    mask[:, 1] = False
    return torch.randint(0, V, (B, L), generator=gen), mask


@pytest.mark.parametrize("name,process", combos(), ids=[f"{n}-{p}" for n, p in combos()])
def test_prompt_positions_never_change(name, process):
    proc = PROCESS.build(process, vocab_size=V)
    cls = SAMPLER.get(name)
    sampler = cls(cls.Config(num_steps=6, record_trajectory=True), schedule=SCHEDULE.build("loglinear"),
                  process=proc, parameterization=PARAMETERIZATION.build("denoiser", process=proc))
    tokens, mask = _prompt()
    net = RandomNet(proc.num_states)
    out = sampler.sample(net, B, L, torch.Generator().manual_seed(1), tokens, prompt_mask_BL=mask)
    assert out.nfe == net.calls <= 6 and len(out.trajectory) >= 1
    for z in (*out.trajectory, out.tokens_BL):
        assert torch.equal(z[mask], tokens[mask])
    assert int(out.tokens_BL.max()) < V  # free positions were generated (never the mask id)
    if out.noise_BL is not None:  # AUDM: the prompt reads as certainly clean
        assert bool((out.noise_BL[mask] != tokens[mask]).all())


def test_prompt_mask_argument_errors():
    proc = PROCESS.build("masked", vocab_size=V)
    cls = SAMPLER.get("ancestral")
    sampler = cls(cls.Config(num_steps=2), schedule=SCHEDULE.build("loglinear"), process=proc,
                  parameterization=PARAMETERIZATION.build("denoiser", process=proc))
    tokens, mask = _prompt()
    net, gen = RandomNet(proc.num_states), torch.Generator()
    with pytest.raises(ValueError, match="without the prompt tokens"):
        sampler.sample(net, B, L, gen, prompt_mask_BL=mask)
    with pytest.raises(ValueError, match="not both"):
        sampler.sample(net, B, L, gen, tokens, 2, prompt_mask_BL=mask)
    with pytest.raises(ValueError, match=r"must both be \[batch_size, seq_len\]"):
        sampler.sample(net, B, L, gen, tokens[:, :4], prompt_mask_BL=mask[:, :4])
    with pytest.raises(ValueError, match="real tokens"):
        sampler.sample(net, B, L, gen, torch.where(mask, V, tokens), prompt_mask_BL=mask)


def test_confidence_spreads_its_steps_over_the_free_positions():
    proc = PROCESS.build("masked", vocab_size=V)
    cls = SAMPLER.get("confidence")
    steps = 3
    sampler = cls(cls.Config(num_steps=steps, record_trajectory=True), schedule=SCHEDULE.build("loglinear"),
                  process=proc, parameterization=PARAMETERIZATION.build("denoiser", process=proc))
    tokens, mask = torch.zeros(B, L, dtype=torch.long), torch.zeros(B, L, dtype=torch.bool)
    mask[:, :6] = True  # 6 free positions, 3 steps -> 2 unmasked per step
    out = sampler.sample(RandomNet(proc.num_states), B, L, torch.Generator(), tokens, prompt_mask_BL=mask)
    masked_left = [int((z == proc.mask_id).sum(-1).max()) for z in out.trajectory]
    assert masked_left == [4, 2, 0]
