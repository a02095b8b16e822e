"""AR transformer: registry, causality (exact, by perturbation), doc mask, score, sizes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from udmtrain.models.ar import ARTransformer
from udmtrain.models.flops import build_on_meta, num_params
from udmtrain.registry import MODEL

V = 64


def tiny(**overrides) -> ARTransformer.Config:
    return ARTransformer.Config(hidden_size=32, num_blocks=2, num_heads=4, dropout=0.0, **overrides)


def tokens(B=2, L=10, seed=0):
    return torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(seed))


def test_registered_and_rejects_noise_tokens():
    assert MODEL.get("ar_transformer") is ARTransformer
    with pytest.raises(ValueError, match="takes no diffusion noise tokens"):
        ARTransformer(tiny(), V, uses_noise_tokens=True)
    with pytest.raises(ValueError, match=r"model \(ar_transformer\): size='tiny'.*hidden_size=32"):
        ARTransformer.Config(size="tiny", hidden_size=32)


def test_shapes_and_uniform_initial_prediction():
    net = ARTransformer(tiny(), V)
    logits = net(tokens())
    assert logits.shape == (2, 10, V) and logits.dtype == torch.float32
    assert torch.count_nonzero(logits) == 0  # zero-init head


@pytest.mark.parametrize("j", [0, 4, 9])
def test_causal_output_at_l_independent_of_later_tokens(j, perturb):
    net = ARTransformer(tiny(), V).eval()
    perturb(net)
    x = tokens()
    x2 = x.clone()
    x2[:, j] = (x2[:, j] + 5) % V
    a, b = net(x), net(x2)
    torch.testing.assert_close(a[:, :j], b[:, :j], atol=1e-6, rtol=0)
    assert not torch.allclose(a[:, j:], b[:, j:], atol=1e-5)


def test_doc_mask_restarts_context(perturb):
    net = ARTransformer(tiny(), V).eval()
    perturb(net)
    x = tokens(B=1, L=10)
    doc = torch.tensor([[0] * 5 + [1] * 5])
    # the second document scores exactly as if it were alone (RoPE is relative, so the shift is harmless)
    alone = net(x[:, 5:])
    packed = net(x, doc_ids_BL=doc)
    torch.testing.assert_close(packed[:, 5:], alone, atol=1e-5, rtol=1e-5)
    x2 = x.clone()
    x2[0, :5] = (x2[0, :5] + 1) % V
    torch.testing.assert_close(net(x2, doc_ids_BL=doc)[:, 5:], packed[:, 5:], atol=1e-6, rtol=0)


def test_score_is_shifted_cross_entropy(perturb):
    net = ARTransformer(tiny(), V).eval()
    perturb(net)
    x = tokens()
    nll = net.score(x)
    assert nll.shape == (2, 9)
    logp = F.log_softmax(net(x).double(), -1)
    expected = -logp[:, :-1].gather(-1, x[:, 1:, None])[..., 0]
    torch.testing.assert_close(nll.double(), expected, atol=1e-5, rtol=1e-5)


def test_bf16_autocast_forward_backward():
    net = ARTransformer(tiny(), V)
    x = tokens()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = net(x)
    F.cross_entropy(logits.float()[:, :-1].reshape(-1, V), x[:, 1:].reshape(-1)).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


def test_small_parameter_count():
    # DiT small without adaLN/time: embedding + 12 x (2 norms, qkv, out, mlp) + final norm + head
    vocab = 50257
    block = 2 * 768 + 768 * 2304 + 768 * 768 + (768 * 3072 + 3072) + (3072 * 768 + 768)
    expected = vocab * 768 + 12 * block + 768 + 768 * vocab + vocab
    assert num_params(build_on_meta(ARTransformer.Config(size="small"), vocab)) == expected


def test_learned_positions_change_the_prediction_and_check_the_length():
    cfg = dict(hidden_size=32, num_blocks=2, num_heads=4, dropout=0.0)
    net = ARTransformer(ARTransformer.Config(**cfg, learned_positions=10), 16)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randint(0, 16, (2, 10))
    before = net(x)
    with torch.no_grad():
        net.positions.weight.add_(1.0)
    assert not torch.allclose(before, net(x))
    with pytest.raises(ValueError, match=r"model.learned_positions >= 11"):
        net(torch.randint(0, 16, (2, 11)))
