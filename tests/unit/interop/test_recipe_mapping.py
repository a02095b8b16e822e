"""Reference config <-> udmtrain recipe: every fixture's derived recipe maps back to a reference config
that derives the same recipe; runs without a reference equivalent are refused by the export."""

from __future__ import annotations

import dataclasses

import pytest
from interop_helpers import FIXTURES, fixture

from udmtrain.interop.errors import InteropError
from udmtrain.interop.importer import derive
from udmtrain.interop.recipe import config_from_recipe
from udmtrain.interop.reference import read_checkpoint

ARCH = ("model", "process", "schedule", "parameterization", "loss", "sampler", "tokenizer", "train")


@pytest.mark.parametrize("name", FIXTURES)
def test_config_round_trip(name, tmp_path):
    ref = read_checkpoint(fixture(name), "rev_udm")
    cfg = derive(ref, tmp_path / "a", "none")[0]
    back = config_from_recipe(cfg)
    assert back["algo"]["name"] == ref.config["algo"]["name"]
    ref.config = back
    again = derive(ref, tmp_path / "a", "none")[0]
    assert {k: cfg.to_dict()[k] for k in ARCH} == {k: again.to_dict()[k] for k in ARCH}
    assert cfg.data.seq_len == again.data.seq_len


@pytest.mark.parametrize("section, change, message", [
    ("schedule", {"name": "cosine"}, "schedule 'cosine'"),
    ("model", {"mlp_ratio": 2}, "mlp_ratio=2"),
])
def test_export_refuses_runs_without_reference_equivalent(tmp_path, section, change, message):
    ref = read_checkpoint(fixture("udlm_mean_loo"), "rev_udm")
    cfg = derive(ref, tmp_path / "a", "none")[0]
    spec = getattr(cfg, section)
    if "name" in change:
        spec = dataclasses.replace(spec, name=change["name"])
    else:
        spec = dataclasses.replace(spec, cfg=dataclasses.replace(spec.cfg, **change))
    with pytest.raises(InteropError, match=message):
        config_from_recipe(dataclasses.replace(cfg, **{section: spec}))


def test_export_refuses_shared_embedding_fusion(tmp_path):
    ref = read_checkpoint(fixture("audm_separate_linear"), "rev_udm")
    cfg = derive(ref, tmp_path / "a", "none")[0]
    fused = dataclasses.replace(cfg.model.cfg, noise_conditioning="shared_embedding")
    model = dataclasses.replace(cfg.model, cfg=fused)
    with pytest.raises(InteropError, match="noise_conditioning='shared_embedding' has no reference equivalent"):
        config_from_recipe(dataclasses.replace(cfg, model=model))
