"""DiT: registry, config rules, init properties, conditioning, attention pattern, precision, sizes."""

from __future__ import annotations

import pytest
import torch

from udmtrain.models.dit import DiT, DiTBlock
from udmtrain.models.flops import build_on_meta, num_params
from udmtrain.registry import MODEL

V = 64


def tiny(**overrides) -> DiT.Config:
    return DiT.Config(hidden_size=32, num_blocks=2, num_heads=4, cond_dim=16, dropout=0.0, **overrides)


def inputs(B=2, L=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, L), generator=g), torch.rand(B, generator=g) * 3


def test_registered_and_built_by_registry():
    assert MODEL.get("dit") is DiT
    net = MODEL.build("dit", tiny(), vocab_size=V)
    assert isinstance(net, DiT) and net.vocab_size == V


def test_config_errors_name_the_fields():
    with pytest.raises(ValueError, match=r"model \(dit\): size='small'.*num_heads=8 \(preset 12\)"):
        DiT.Config(size="small", num_heads=8)
    with pytest.raises(ValueError, match="hidden_size, num_blocks, num_heads are required"):
        DiT.Config()
    with pytest.raises(ValueError, match="dropout"):
        DiT.Config(hidden_size=32, num_blocks=2, num_heads=4, dropout=1.5)
    assert DiT.Config(size="medium", hidden_size=1024).dims() == (1024, 24, 16)


def test_shapes_dtypes_and_uniform_initial_prediction():
    net = DiT(tiny(), V)
    xt, sigma = inputs()
    logits = net(xt, sigma)
    assert logits.shape == (2, 12, V) and logits.dtype == torch.float32
    # zero-init head (and zero-init final adaLN): all logits exactly 0 -> uniform prediction
    assert torch.count_nonzero(logits) == 0


def test_adaln_zero_blocks_are_identity_at_init():
    block = DiTBlock(32, 4, 16, 4, dropout=0.1, attn_backend="sdpa")
    block.train()  # even with dropout active: the gates are exactly zero
    x, c = torch.randn(2, 7, 32), torch.randn(2, 16)
    assert torch.equal(block(x, c, None), x)


def test_time_conditioning_changes_output_only_when_enabled(perturb):
    xt, _ = inputs()
    s1, s2 = torch.tensor([0.1, 0.1]), torch.tensor([2.0, 2.0])
    on, off = DiT(tiny(), V).eval(), DiT(tiny(time_conditioning=False), V).eval()
    off.load_state_dict(on.state_dict())
    perturb(on)
    perturb(off)
    assert not torch.allclose(on(xt, s1), on(xt, s2), atol=1e-4)
    assert torch.equal(off(xt, s1), off(xt, s2))
    # time_conditioning=False is exactly the enabled network at sigma = 0
    torch.testing.assert_close(off(xt, s1), on(xt, torch.zeros(2)))


def test_attention_is_bidirectional(perturb):
    net = DiT(tiny(), V).eval()
    perturb(net)
    xt, sigma = inputs()
    xt2 = xt.clone()
    xt2[:, -1] = (xt2[:, -1] + 1) % V
    a, b = net(xt, sigma), net(xt2, sigma)
    assert not torch.allclose(a[:, 0], b[:, 0], atol=1e-5)  # position 0 sees the last token


def test_doc_mask_isolates_documents(perturb):
    net = DiT(tiny(), V).eval()
    perturb(net)
    xt, sigma = inputs(L=10)
    doc = torch.tensor([[0] * 4 + [1] * 6, [3] * 10])
    xt2 = xt.clone()
    xt2[0, 4:] = (xt2[0, 4:] + 7) % V  # change only document 1 of row 0
    a, b = net(xt, sigma, doc_ids_BL=doc), net(xt2, sigma, doc_ids_BL=doc)
    torch.testing.assert_close(a[0, :4], b[0, :4], atol=1e-5, rtol=0)
    assert not torch.allclose(a[0, 4:], b[0, 4:], atol=1e-4)
    # without the mask, document 0 does see the change
    assert not torch.allclose(net(xt, sigma)[0, :4], net(xt2, sigma)[0, :4], atol=1e-4)
    # one document per row == no mask
    torch.testing.assert_close(a[1], net(xt, sigma)[1], atol=1e-5, rtol=1e-5)


def test_bf16_autocast_forward_backward_close_to_fp32(perturb):
    net = DiT(tiny(), V).eval()
    perturb(net, std=0.05)
    xt, sigma = inputs()
    ref = net(xt, sigma)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(xt, sigma)
    assert out.dtype == torch.bfloat16  # documented: the objective upcasts
    torch.testing.assert_close(out.float(), ref, atol=5e-2, rtol=5e-2)
    out.float().logsumexp(-1).sum().backward()
    grads = [p.grad for p in net.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(p.grad.dtype == torch.float32 for p in net.parameters())


def test_model_cast_to_bf16_runs_without_autocast():
    """An engine may cast the whole module to bf16 (no autocast): the fp32 islands must cope."""
    net = DiT(tiny(), V).to(torch.bfloat16)
    xt, sigma = inputs()
    assert net(xt, sigma).dtype == torch.bfloat16


def test_dropout_only_in_train_mode(perturb):
    net = DiT(DiT.Config(hidden_size=32, num_blocks=2, num_heads=4, cond_dim=16, dropout=0.5), V)
    perturb(net)
    xt, sigma = inputs()
    net.eval()
    assert torch.equal(net(xt, sigma), net(xt, sigma))
    net.train()
    assert not torch.equal(net(xt, sigma), net(xt, sigma))


# --- AUDM noise conditioning -------------------------------------------------------------------

MODES = ["separate_linear", "shared_mlp", "shared_embedding"]


def test_noise_conditioning_consistency_errors():
    with pytest.raises(ValueError, match="noise_conditioning must be one of separate_linear"):
        DiT(tiny(), V, uses_noise_tokens=True)
    with pytest.raises(ValueError, match="needs a process with noise tokens"):
        DiT(tiny(noise_conditioning="shared_mlp"), V, uses_noise_tokens=False)
    net = DiT(tiny(noise_conditioning="shared_mlp"), V, uses_noise_tokens=True)
    xt, sigma = inputs()
    with pytest.raises(ValueError, match="noise_BL is required"):
        net(xt, sigma)
    with pytest.raises(ValueError, match="noise_BL is required"):
        DiT(tiny(), V)(xt, sigma, noise_BL=xt)


@pytest.mark.parametrize("mode", MODES)
def test_noise_conditioning_uses_noise_and_match_bit(mode, perturb):
    net = DiT(tiny(noise_conditioning=mode), V, uses_noise_tokens=True).eval()
    xt, sigma = inputs()
    g = torch.Generator().manual_seed(1)
    noise = torch.randint(0, V, xt.shape, generator=g)
    noise[:, :4] = xt[:, :4]  # some active positions (z = n)
    assert torch.count_nonzero(net(xt, sigma, noise)) == 0  # zero-init head still uniform
    perturb(net)
    base = net(xt, sigma, noise)
    # a different noise token at an inactive position changes the output
    noise2 = noise.clone()
    noise2[:, 6] = (noise2[:, 6] + 1) % V
    noise2[:, 6] = torch.where(noise2[:, 6] == xt[:, 6], (noise2[:, 6] + 1) % V, noise2[:, 6])
    assert not torch.allclose(net(xt, sigma, noise2), base, atol=1e-5)
    # the match bit matters: make position 8 active
    noise3 = noise.clone()
    noise3[:, 8] = xt[:, 8]
    assert not torch.allclose(net(xt, sigma, noise3), base, atol=1e-5)


def test_noise_conditioning_parameter_overheads():
    d = 32
    base = num_params(DiT(tiny(), V))
    sep = num_params(DiT(tiny(noise_conditioning="separate_linear"), V, True))
    mlp = num_params(DiT(tiny(noise_conditioning="shared_mlp"), V, True))
    shared = num_params(DiT(tiny(noise_conditioning="shared_embedding"), V, True))
    assert sep - base == V * d + (2 * d + 1) * d + d  # second table + Linear(2d+1 -> d) (+ bias)
    assert mlp - base == (2 * d + 1) * 4 * d + 4 * d + 4 * d * d + d
    assert shared - base == 2 * d  # parameter-matched up to the gate and match vectors


# --- parameter counts of docs/theory.md §6 (meta device: no memory) --------------------------------

# small DiT, d=768, 12 blocks, cond 128, counted by hand from the layer shapes:
#   time MLP 256*128+128 + 128*128+128 = 49,408
#   block: 2 norms 1,536 + qkv 1,769,472 + out 589,824 + mlp 2,362,368 + 2,360,064 + adaLN 594,432
#          = 7,677,696; x12 = 92,132,352
#   final: norm 768 + adaLN 198,144; embedding V*768; head 768*V + V
SMALL_FIXED = 49_408 + 92_132_352 + 768 + 198_144


@pytest.mark.parametrize("vocab, spec_millions", [(50258, 169.6), (30522, 139.3)])
def test_small_parameter_counts_match_spec(vocab, spec_millions):
    count = num_params(build_on_meta(DiT.Config(size="small"), vocab))
    assert count == SMALL_FIXED + 768 * vocab + 768 * vocab + vocab
    assert abs(count / 1e6 - spec_millions) / spec_millions < 1e-3


@pytest.mark.parametrize("vocab, spec_millions", [(30522, 163.9), (50257, 209.4)])
def test_small_separate_linear_counts_match_spec(vocab, spec_millions):
    plain = num_params(build_on_meta(DiT.Config(size="small"), vocab))
    sep = num_params(build_on_meta(DiT.Config(size="small", noise_conditioning="separate_linear"), vocab, True))
    assert sep - plain == vocab * 768 + (2 * 768 + 1) * 768 + 768
    assert abs(sep / 1e6 - spec_millions) / spec_millions < 1e-3
    mlp = num_params(build_on_meta(DiT.Config(size="small", noise_conditioning="shared_mlp"), vocab, True))
    assert round((mlp - plain) / 1e6, 1) == 7.1


def test_learned_positions_enter_only_as_an_input_sum_and_check_the_length():
    """The table is the only extra tensor; with it zeroed the network equals the one without it, with
    it non-zero the output differs; a sequence longer than the table is refused, naming the key."""
    with_table, without = DiT(tiny(learned_positions=12), V), DiT(tiny(), V)
    assert set(with_table.state_dict()) - set(without.state_dict()) == {"positions.weight"}
    with torch.no_grad():  # adaLN-Zero and the zero head make every DiT constant at init: perturb them
        for p in with_table.parameters():
            p.add_(0.3 * torch.randn_like(p))
    without.load_state_dict({k: v for k, v in with_table.state_dict().items() if k != "positions.weight"})
    x, sigma = inputs(L=12)
    assert not torch.allclose(with_table(x, sigma), without(x, sigma))
    with torch.no_grad():
        with_table.positions.weight.zero_()
    torch.testing.assert_close(with_table(x, sigma), without(x, sigma))
    with pytest.raises(ValueError, match=r"model.learned_positions >= 13 \(it is 12\)"):
        with_table(*inputs(L=13))
    with pytest.raises(ValueError, match="model.learned_positions >= 20"):
        with_table.check_seq_len(20)
    with pytest.raises(ValueError, match="learned_positions must be >= 0"):
        tiny(learned_positions=-1)
    with_table.check_seq_len(12)
    without.check_seq_len(10_000)  # RoPE only: any length
