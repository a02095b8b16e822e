"""One sampler builder for every tool: the gen_ppl sweep (``with_sampler``) builds exactly the sampler
that ``load_for_inference`` (sample.py / gen_ppl.py) builds, including what it learns from the model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from udmtrain.config import load_recipe
from udmtrain.train.build import build_components
from udmtrain.train.inference import Loaded, with_sampler

REPO = Path(__file__).resolve().parents[3]
TINY = ["model.size=null", "model.hidden_size=16", "model.num_blocks=1", "model.num_heads=2", "model.cond_dim=8",
        "data.seq_len=8", "sampler.num_steps=8"]


def _loaded(tmp_path: Path, overrides: list[str]) -> Loaded:
    """A Loaded whose step directory holds only the recipe (``with_sampler`` reads nothing else)."""
    cfg = load_recipe(str(REPO / "recipes" / "mdlm.yaml"), TINY + overrides)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    components = build_components(cfg, 11)
    return Loaded(cfg=cfg, components=components, model=components.model, tokenizer=None, step_dir=tmp_path,
                  meta={}, vocab_size=11)


@pytest.mark.parametrize("time_conditioning,cached", [(True, False), (False, True)])
def test_sweep_sampler_equals_the_normal_one(tmp_path, time_conditioning, cached):
    loaded = _loaded(tmp_path, [f"model.time_conditioning={str(time_conditioning).lower()}"])
    normal = loaded.components.sampler
    swept = with_sampler(loaded, []).components.sampler
    assert type(swept) is type(normal) and swept.cfg == normal.cfg
    assert swept.time_conditioning == normal.time_conditioning == time_conditioning
    # the cache (exact only for a network that ignores time) is decided identically on both paths
    assert swept.use_cache == normal.use_cache == cached
    # and the two draw the same samples from the same seed (same NFE: no stale predictions on one side)
    net = loaded.network()
    a = normal.sample(net, 2, 8, torch.Generator().manual_seed(0))
    b = swept.sample(net, 2, 8, torch.Generator().manual_seed(0))
    assert torch.equal(a.tokens_BL, b.tokens_BL) and a.nfe == b.nfe


def test_sampler_has_no_recipe_key_for_what_the_model_knows(tmp_path):
    from udmtrain.config import ConfigError

    with pytest.raises(ConfigError, match="time_conditioned"):
        load_recipe(str(REPO / "recipes" / "mdlm.yaml"), TINY + ["sampler.time_conditioned=true"])
