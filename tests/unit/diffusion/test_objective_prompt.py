"""Prompt positions through the objectives: never noised, never scored, not counted (every process,
the AR baseline), with a tiny real DiT and a recording wrapper around it."""

import pytest
import torch
from test_objective_doc_mask import RECIPES, diffusion_setup

from udmtrain.diffusion.objective import ARObjective
from udmtrain.registry import LOSS

V, B, L = 11, 2, 12
PROMPT = torch.tensor([[True, True, False, True, False, False, True, False, False, False, True, False],
                       [False, True, True, False, False, True, False, False, True, False, False, False]])


class Recording:
    """Calls ``model``; adds ``garbage`` to the logits at ``where`` positions; keeps the inputs seen."""

    def __init__(self, model, where=None, garbage=0.0):
        self.model, self.where, self.garbage, self.seen = model, where, garbage, []

    def __call__(self, xt_BL, sigma_B, noise_BL=None, **kw):
        self.seen.append((xt_BL.clone(), None if noise_BL is None else noise_BL.clone()))
        logits = self.model(xt_BL, sigma_B, noise_BL, **kw)
        if self.where is not None:
            bump = torch.randn(logits.shape, generator=torch.Generator().manual_seed(3)) * self.garbage
            logits = logits + torch.where(self.where[..., None], bump, torch.zeros_like(bump))
        return logits


def _x0(seed=0):
    return torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("process", sorted(RECIPES))
def test_prompt_is_never_noised_and_never_scored(process):
    objective, model = diffusion_setup(process)
    x0, valid = _x0(), torch.ones(B, L, dtype=torch.bool)
    valid[1, -1] = False  # a padding position stays out too
    t_B = torch.tensor([0.97, 0.999], dtype=torch.float64)  # nearly everything noised elsewhere

    def run(where=None, garbage=0.0):
        net = Recording(model, where, garbage)
        with torch.no_grad():
            out = objective(net, x0, valid, t_B, torch.Generator().manual_seed(5), prompt_BL=PROMPT)
        return out, net.seen[0]

    out, (xt, noise) = run()
    assert torch.equal(xt[PROMPT], x0[PROMPT])  # clean prompt
    assert not torch.equal(xt[~PROMPT], x0[~PROMPT])  # the rest was corrupted
    if noise is not None:  # AUDM: the prompt reads as certainly clean (n != z)
        assert bool((noise[PROMPT] != xt[PROMPT]).all())
    assert int(out.num_tokens) == int((valid & ~PROMPT).sum())
    garbled, _ = run(PROMPT, 50.0)  # different logits at the prompt: same loss
    assert torch.allclose(garbled.loss, out.loss) and torch.allclose(garbled.nelbo_sum, out.nelbo_sum)
    other, _ = run(~PROMPT, 50.0)  # control: logits elsewhere do matter
    assert not torch.allclose(other.loss, out.loss)
    # the eval integrand is 0 on the prompt and equals the training one elsewhere
    with torch.no_grad():
        per = objective.per_token_nelbo(model, x0, t_B, torch.Generator().manual_seed(5), prompt_BL=PROMPT)
    assert bool((per[PROMPT] == 0).all())
    assert torch.allclose(per[valid & ~PROMPT].double().sum(), out.nelbo_sum.double(), rtol=1e-5)


def test_ar_loss_ignores_prompt_targets():
    loss = LOSS.build("ar_nll")
    objective = ARObjective(loss)
    x0, valid = _x0(1), torch.ones(B, L, dtype=torch.bool)
    base = torch.randn(B, L, V, generator=torch.Generator().manual_seed(2))
    # logits at position l predict token l + 1: perturb those whose target is a prompt token
    predicts_prompt = torch.zeros(B, L, dtype=torch.bool)
    predicts_prompt[:, :-1] = PROMPT[:, 1:]

    def run(where):
        logits = base + 30.0 * torch.where(where[..., None], torch.randn(B, L, V), torch.zeros(B, L, V))
        return objective(lambda x, **kw: logits, x0, valid, prompt_BL=PROMPT)

    out = run(torch.zeros(B, L, dtype=torch.bool))
    counted = valid & ~PROMPT
    counted[:, 0] = False
    assert int(out.num_tokens) == int(counted.sum())
    assert torch.allclose(run(predicts_prompt).loss, out.loss)
    assert not torch.allclose(run(~predicts_prompt).loss, out.loss)
