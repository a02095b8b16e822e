"""Anything the importer cannot map exactly is a clear error naming it: unknown algorithm, non-DiT
backbone, causal model, unexpected / missing key, shape mismatch, wrong layout, wrong vocabulary."""

from __future__ import annotations

import copy

import pytest
from interop_helpers import fixture, rekeyed

from udmtrain.interop.errors import InteropError
from udmtrain.interop.importer import convert, derive
from udmtrain.interop.reference import read_checkpoint
from udmtrain.train.build import build_components


def _import(path, tmp_path, layout="mdlm", tokenizer="none"):
    ref = read_checkpoint(path, layout)
    cfg, V, fusion = derive(ref, tmp_path / "run", tokenizer)
    model = build_components(cfg, V, with_sampler=False).model
    return convert(ref, model, fusion, cfg.process.name == "masked")


def _config(**algo):
    config = copy.deepcopy(read_checkpoint(fixture("udlm_mean_loo"), "rev_udm").config)
    config["algo"].update(algo)
    return config


@pytest.mark.parametrize("algo, message", [
    ({"name": "sedd"}, "algo.name='sedd' has no udmtrain equivalent"),
    ({"backbone": "dimamba"}, "backbone 'dimamba': only the DiT"),
    ({"causal_attention": True}, "causal"),
    ({"model_prediction": "score"}, "algo.model_prediction='score'"),
    ({"loss_fn": "kl"}, "algo.loss_fn='kl'"),
])
def test_unmappable_config_is_an_error(tmp_path, algo, message):
    path = rekeyed("udlm_mean_loo", tmp_path / "x.ckpt", config=_config(**algo))
    with pytest.raises(InteropError, match=message):
        _import(path, tmp_path)


def test_unexpected_and_missing_keys(tmp_path):
    def extra(state):
        state["backbone.blocks.0.attn_bias"] = state["backbone.blocks.0.norm1.weight"]

    with pytest.raises(InteropError, match=r"unexpected \['blocks.0.attn_bias'\], missing \[\]"):
        _import(rekeyed("udlm_mean_loo", tmp_path / "a.ckpt", edit=extra, with_ema=False), tmp_path)

    def drop(state):
        del state["backbone.output_layer.linear.bias"]

    with pytest.raises(InteropError, match=r"missing \['output_layer.linear.bias'\]"):
        _import(rekeyed("udlm_mean_loo", tmp_path / "b.ckpt", edit=drop, with_ema=False), tmp_path)
    # with the EMA list kept, the count no longer matches the parameters: refused before any mapping
    with pytest.raises(InteropError, match=r"ema.shadow_params has 30 tensors but the backbone has 29"):
        _import(rekeyed("udlm_mean_loo", tmp_path / "c.ckpt", edit=drop), tmp_path)


def test_shape_mismatch(tmp_path):
    config = _config()
    config["model"]["cond_dim"] = 8  # the tensors were trained with cond_dim 16
    with pytest.raises(InteropError, match=r"shape mismatch .*sigma_map.mlp.0.weight \(16, 256\) -> "
                                           r"time_embedding.mlp.0.weight \(8, 256\)"):
        _import(rekeyed("udlm_mean_loo", tmp_path / "d.ckpt", config=config), tmp_path)


def test_vocabulary_must_fit_the_tokenizer(tmp_path):
    with pytest.raises(InteropError, match="vocabulary has 50 rows but tokenizer ids:40 has V=40"):
        _import(fixture("udlm_mean_loo"), tmp_path, layout="rev_udm", tokenizer="ids:40")
    with pytest.raises(InteropError, match="expected 52 \\(V \\+ the mask\\)"):  # a masked head is V+1 exactly
        _import(fixture("mdlm"), tmp_path, layout="rev_udm", tokenizer="ids:51")
    ref = read_checkpoint(fixture("udlm_mean_loo"), "rev_udm")
    ref.config["data"]["tokenizer_name_or_path"] = "bert-base-uncased"
    with pytest.raises(InteropError, match="tokenizer is 'bert-base-uncased'; pass --tokenizer"):
        derive(ref, tmp_path / "r", "auto")


def test_unknown_layout(tmp_path):
    with pytest.raises(InteropError, match="supported layouts"):
        read_checkpoint(fixture("mdlm"), "sedd")


def test_config_values_are_typed_and_references_resolve(tmp_path):
    """OmegaConf keeps ${...} references unresolved in the pickle: plain ones resolve; wrong types are errors."""
    config = _config()
    config["model"]["length"] = "${data.length}"
    config["data"]["length"] = 12
    config["training"]["sampling_eps"] = "1e-3"  # a float written as a string
    ref = read_checkpoint(rekeyed("udlm_mean_loo", tmp_path / "a.ckpt", config=config), "mdlm")
    cfg = derive(ref, tmp_path / "r", "none")[0]
    assert cfg.data.seq_len == 12 and cfg.schedule.cfg.eps == 1e-3
    ref.config["algo"]["time_conditioning"] = "False"  # a string is not a bool: never read as True
    with pytest.raises(InteropError, match="algo.time_conditioning='False' is not a bool"):
        derive(ref, tmp_path / "r", "none")
    ref.config["algo"]["time_conditioning"] = True
    ref.config["model"]["length"] = "${data.length}-1"
    with pytest.raises(InteropError, match="only plain"):
        derive(ref, tmp_path / "r", "none")
