"""Exactness: the imported network's logits equal the reference forward's (produced by the reference
code itself, tests/data/rev_udm) for the raw and the EMA weights of every fixture, through the
recipe derived from each checkpoint's own config; plus the MDLM-family and hub layouts."""

from __future__ import annotations

import json

import pytest
import torch
from interop_helpers import FIXTURES, expected, fixture, logits, rekeyed

from udmtrain.interop.importer import convert, derive
from udmtrain.interop.keys import name_pairs
from udmtrain.interop.reference import read_checkpoint
from udmtrain.train.build import build_components

TOL = 1e-5
DERIVED = {  # fixture -> (process, parameterization, NELBO loss, sampler); loss_fn cross_entropy -> cross_entropy
    "udlm_mean_loo": ("uniform", "loo", "plugin_nelbo", "ancestral"),
    "udlm_mean": ("uniform", "denoiser", "plugin_nelbo", "ancestral"),
    "mdlm": ("masked", "denoiser", "mdlm_nelbo", "ancestral"),
    "audm_separate_linear": ("absorbing_uniform", "denoiser", "audm_nelbo", "ancestral"),
    "audm_shared_mlp": ("absorbing_uniform", "denoiser", "audm_nelbo", "ancestral"),
}


def imported_model(ref, tmp_path, tokenizer="none"):
    """(cfg, model with raw weights, raw state, EMA state) as the importer builds them."""
    cfg, V, fusion = derive(ref, tmp_path / "run", tokenizer)
    model = build_components(cfg, V, with_sampler=False).model
    raw, ema = convert(ref, model, fusion, cfg.process.name == "masked")
    return cfg, model, raw, ema


def assert_parity(model, raw, ema, exp):
    for state, key in ((raw, "logits_raw"), (ema, "logits_ema")):
        model.load_state_dict(state)
        out = logits(model, exp)
        assert out.shape == exp[key].shape
        assert (out - exp[key]).abs().max().item() <= TOL, key


@pytest.mark.parametrize("name", FIXTURES)
def test_parity_raw_and_ema(name, tmp_path):
    ref = read_checkpoint(fixture(name), "rev_udm")
    exp = expected(name)
    cfg, model, raw, ema = imported_model(ref, tmp_path)
    assert_parity(model, raw, ema, exp)
    # the recipe derived from the checkpoint's own config
    process, param, nelbo, sampler = DERIVED[name]
    loss = "cross_entropy" if exp["algo"]["loss_fn"] == "cross_entropy" else nelbo
    assert (cfg.process.name, cfg.parameterization.name, cfg.loss.name, cfg.sampler.name) == (process, param, loss,
                                                                                               sampler)
    m = cfg.model.cfg
    assert (m.hidden_size, m.num_blocks, m.num_heads, m.cond_dim) == (32, 2, 2, 16)
    assert m.time_conditioning == bool(exp["algo"]["time_conditioning"])
    assert m.noise_conditioning == exp["algo"].get("conditioning_fusion", "none")
    assert cfg.data.seq_len == 12 and cfg.schedule.cfg.eps == pytest.approx(1e-3)
    assert cfg.tokenizer.name == "ids" and cfg.tokenizer.cfg.vocab_size == 50  # MDLM: 50 tokens + mask id 50
    assert model.vocab_size == exp["logits_raw"].shape[-1]
    # the EMA differs from the raw weights, so the two checks are independent
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)


@pytest.mark.parametrize("name", FIXTURES)
def test_file_order_is_the_reference_parameter_order(name):
    """The EMA shadow list is zipped with this order; the fixture's state_dict must list it."""
    ref = read_checkpoint(fixture(name), "rev_udm")
    fusion = expected(name)["algo"].get("conditioning_fusion", "none")
    assert [k for k in ref.backbone if k != "rotary_emb.inv_freq"] == [r for r, _ in name_pairs(2, fusion)]


@pytest.mark.parametrize("name", ["udlm_mean", "audm_shared_mlp"])
def test_mdlm_family_layout(name, tmp_path):
    path = rekeyed(name, tmp_path / "m.ckpt")
    with pytest.raises(ValueError, match="the keys fit --from mdlm"):
        read_checkpoint(path, "rev_udm")
    ref = read_checkpoint(path, "mdlm")
    assert ref.info["global_step"] == 7
    _, model, raw, ema = imported_model(ref, tmp_path)
    assert_parity(model, raw, ema, expected(name))


def test_mdlm_top_level_config(tmp_path):
    """MDLM's own config style (no algo section: diffusion absorbing_state + parameterization subs)."""
    ref0 = read_checkpoint(fixture("mdlm"), "rev_udm")
    config = {k: v for k, v in ref0.config.items() if k != "algo"}
    config.update(diffusion="absorbing_state", parameterization="subs", backbone="dit", time_conditioning=False)
    ref = read_checkpoint(rekeyed("mdlm", tmp_path / "m.ckpt", config=config), "mdlm")
    cfg, model, raw, ema = imported_model(ref, tmp_path)
    assert cfg.process.name == "masked" and cfg.loss.name == "mdlm_nelbo"
    assert_parity(model, raw, ema, expected("mdlm"))


def test_hub_safetensors_layout(tmp_path):
    from safetensors.torch import save_file

    ref0 = read_checkpoint(fixture("mdlm"), "rev_udm")
    hub = tmp_path / "hub"
    hub.mkdir()
    save_file({"backbone." + k: v.contiguous() for k, v in ref0.backbone.items()}, str(hub / "model.safetensors"))
    (hub / "config.json").write_text(json.dumps({
        "model_type": "mdlm", "vocab_size": 51, "model_length": 12, "hidden_dim": 32, "cond_dim": 16,
        "n_blocks": 2, "n_heads": 2, "dropout": 0.1, "time_conditioning": False}))
    ref = read_checkpoint(hub, "hub")
    ref.config.setdefault("training", {})["sampling_eps"] = 1e-3
    cfg, model, raw, ema = imported_model(ref, tmp_path)
    model.load_state_dict(raw)
    exp = expected("mdlm")
    assert (logits(model, exp) - exp["logits_raw"]).abs().max().item() <= TOL
    assert all(torch.equal(raw[k], ema[k]) for k in raw)  # one set of weights: used for both


def test_extra_vocabulary_row_is_dropped_for_uniform_heads(tmp_path):
    """A uniform head one row wider than V (GPT-2 + [PAD]) is cut to V: logits = the first V columns."""
    ref = read_checkpoint(fixture("udlm_mean_loo"), "rev_udm")
    exp = expected("udlm_mean_loo")
    cfg, model, raw, ema = imported_model(ref, tmp_path, tokenizer="ids:49")
    assert model.vocab_size == 49 and raw["embedding.weight"].shape == (49, 32)
    x = exp["x"].clamp(max=48)  # ids the V-wide model can see
    model.load_state_dict(raw)
    model.eval()
    with torch.no_grad():
        out = model(x, exp["sigma"])
    _, wide_model, wide_raw, _ = imported_model(ref, tmp_path)  # V = 50: the reference's own width
    wide_model.load_state_dict(wide_raw)
    wide = logits(wide_model, {**exp, "x": x})
    assert (out - wide[..., :49]).abs().max().item() <= TOL


@pytest.mark.parametrize("name, rows, dropped", [("udlm_mean_loo", 50258, 1), ("audm_separate_linear", 50258, 1),
                                                 ("mdlm", 50258, 0)])
def test_gpt2_published_width(name, rows, dropped, tmp_path):
    """Published OpenWebText heads are 50258 wide (GPT-2 + [PAD]): ``--tokenizer auto`` picks GPT-2 from the
    config; MDLM keeps the row as its mask (id V), UDLM/AUDM drop it (one V), logits of the rest unchanged."""
    ref = read_checkpoint(fixture(name), "rev_udm")
    gen = torch.Generator().manual_seed(0)
    for key in ("vocab_embed.embedding", "conditioning_vocab_embed.embedding", "output_layer.linear.weight",
                "output_layer.linear.bias"):
        if key in ref.backbone:
            t = ref.backbone[key]
            ref.backbone[key] = torch.randn((rows, *t.shape[1:]), generator=gen)
    ref.ema_shadow = None
    assert ref.config["data"]["tokenizer_name_or_path"] == "gpt2"
    cfg, model, raw, _ = imported_model(ref, tmp_path, tokenizer="auto")
    assert cfg.tokenizer.name == "gpt2" and model.vocab_size == rows - dropped
    assert torch.equal(raw["final.linear.weight"], ref.backbone["output_layer.linear.weight"][: rows - dropped])
