"""Document attention through the objectives: with ``doc_ids_BL`` a document's per-token loss does not
depend on the other documents of the sequence; without it, it does (tiny real DiT / AR transformer)."""

import pytest
import torch

from udmtrain.diffusion.objective import ARObjective, DiffusionObjective
from udmtrain.registry import LOSS, MODEL, PARAMETERIZATION, PROCESS, SCHEDULE

V, B, L, SPLIT = 11, 2, 12, 5  # document B = positions [0, SPLIT), document A = [SPLIT, L)
RECIPES = {  # process -> (parameterization, loss), as in the shipped recipes
    "masked": ("denoiser", "mdlm_nelbo"),
    "uniform": ("loo", "plugin_nelbo"),
    "absorbing_uniform": ("denoiser", "audm_nelbo"),
}


def perturb_zero_inits(model: torch.nn.Module, std: float = 0.2, seed: int = 0) -> None:
    """Random values for every all-zero parameter (adaLN, head), so the output depends on the input
    (same recipe as tests/unit/models/conftest.py)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if torch.count_nonzero(p) == 0:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def two_documents(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_BL, x_other_BL, doc_ids_BL)``: x_other differs from x only (and everywhere) in document B."""
    gen = torch.Generator().manual_seed(seed)
    x_BL = torch.randint(0, V, (B, L), generator=gen)
    x_other_BL = x_BL.clone()
    x_other_BL[:, :SPLIT] = (x_BL[:, :SPLIT] + 1 + torch.randint(0, V - 1, (B, SPLIT), generator=gen)) % V
    assert (x_other_BL[:, :SPLIT] != x_BL[:, :SPLIT]).all()
    doc_ids_BL = torch.cat([torch.full((B, SPLIT), 3), torch.full((B, L - SPLIT), 4)], dim=1)
    return x_BL, x_other_BL, doc_ids_BL


def diffusion_setup(process_name: str):
    param_name, loss_name = RECIPES[process_name]
    process = PROCESS.build(process_name, vocab_size=V)
    objective = DiffusionObjective(SCHEDULE.build("loglinear"), process,
                                   PARAMETERIZATION.build(param_name, process=process),
                                   LOSS.build(loss_name, process=process))
    noise_conditioning = "separate_linear" if process.uses_noise_tokens else "none"
    torch.manual_seed(0)
    model = MODEL.build("dit", MODEL.get("dit").Config(hidden_size=32, num_blocks=1, num_heads=2, cond_dim=16,
                                                       dropout=0.0, attn_backend="sdpa",
                                                       noise_conditioning=noise_conditioning),
                        vocab_size=process.num_states, uses_noise_tokens=process.uses_noise_tokens)
    perturb_zero_inits(model)
    return objective, model.eval()


def per_token(objective, model, x0_BL, doc_ids_BL):
    t_B = torch.tensor([0.35, 0.8], dtype=torch.float64)
    gen = torch.Generator().manual_seed(7)  # same corruption draws for both sequences
    kwargs = {} if doc_ids_BL is None else {"doc_ids_BL": doc_ids_BL}
    with torch.no_grad():
        return objective.per_token_nelbo(model, x0_BL, t_B, gen, **kwargs)


@pytest.mark.parametrize("process_name", sorted(RECIPES))
def test_diffusion_doc_mask_isolates_documents(process_name):
    objective, model = diffusion_setup(process_name)
    x_BL, x_other_BL, doc_ids_BL = two_documents(1)
    a = slice(SPLIT, L)
    masked, masked_other = (per_token(objective, model, x, doc_ids_BL) for x in (x_BL, x_other_BL))
    assert torch.isfinite(masked).all()
    torch.testing.assert_close(masked[:, a], masked_other[:, a], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(masked[:, :SPLIT], masked_other[:, :SPLIT])  # document B itself did change
    full, full_other = (per_token(objective, model, x, None) for x in (x_BL, x_other_BL))
    assert (full[:, a] - full_other[:, a]).abs().max() > 1e-4  # without the mask A sees B
    # One document spanning the whole sequence is the same as no mask at all.
    torch.testing.assert_close(per_token(objective, model, x_BL, torch.zeros_like(doc_ids_BL)), full,
                               rtol=1e-5, atol=1e-6)


def test_diffusion_call_passes_doc_ids_and_keeps_callables_without_the_keyword():
    objective, model = diffusion_setup("masked")
    x_BL, x_other_BL, doc_ids_BL = two_documents(2)
    valid_BL = torch.ones(B, L, dtype=torch.bool)
    valid_BL[:, :SPLIT] = False  # score document A only
    t_B = torch.tensor([0.5, 0.6])
    outs = [objective(model, x, valid_BL, t_B, torch.Generator().manual_seed(3), doc_ids_BL=doc_ids_BL)
            for x in (x_BL, x_other_BL)]
    assert outs[0].num_tokens == B * (L - SPLIT)
    torch.testing.assert_close(outs[0].loss, outs[1].loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outs[0].nelbo_sum, outs[1].nelbo_sum, rtol=1e-5, atol=1e-6)

    def no_keyword(xt_BL, sigma_B, noise_BL):  # e.g. a test oracle: never sees doc_ids_BL when it is None
        return model(xt_BL, sigma_B, noise_BL)

    plain = objective(no_keyword, x_BL, valid_BL, t_B, torch.Generator().manual_seed(3))
    assert torch.equal(plain.loss, objective(model, x_BL, valid_BL, t_B, torch.Generator().manual_seed(3)).loss)
    with pytest.raises(TypeError):
        objective(no_keyword, x_BL, valid_BL, t_B, torch.Generator().manual_seed(3), doc_ids_BL=doc_ids_BL)
    with pytest.raises(ValueError, match=r"doc_ids_BL has shape \(2, 5\)"):
        objective(model, x_BL, valid_BL, t_B, doc_ids_BL=doc_ids_BL[:, :SPLIT])


def ar_setup():
    torch.manual_seed(0)
    model = MODEL.build("ar_transformer", MODEL.get("ar_transformer").Config(
        hidden_size=32, num_blocks=1, num_heads=2, dropout=0.0, attn_backend="sdpa"), vocab_size=V)
    perturb_zero_inits(model)
    return ARObjective(LOSS.build("ar_nll")), model.eval()


def test_ar_doc_mask_isolates_documents():
    """Document A comes *after* B, so causality alone would not hide B from it."""
    objective, model = ar_setup()
    x_BL, x_other_BL, doc_ids_BL = two_documents(3)
    valid_BL = torch.zeros(B, L, dtype=torch.bool)
    valid_BL[:, SPLIT + 1:] = True  # A's first token is predicted from B's last position: not counted

    def run(x, doc_ids):
        kwargs = {} if doc_ids is None else {"doc_ids_BL": doc_ids}
        with torch.no_grad():
            return objective(model, x, valid_BL, **kwargs)

    masked, masked_other = run(x_BL, doc_ids_BL), run(x_other_BL, doc_ids_BL)
    assert masked.num_tokens == B * (L - SPLIT - 1) and torch.isfinite(masked.loss)
    torch.testing.assert_close(masked.loss, masked_other.loss, rtol=1e-5, atol=1e-6)
    full, full_other = run(x_BL, None), run(x_other_BL, None)
    assert (full.loss - full_other.loss).abs() > 1e-4
    torch.testing.assert_close(run(x_BL, torch.zeros_like(doc_ids_BL)).loss, full.loss, rtol=1e-5, atol=1e-6)
