"""Every shipped recipe (recipes/**/*.yaml except base/) loads and validates with the real components.

Skipped only while a component family's module does not exist yet (ModuleNotFoundError naming that
module); any other failure is a real error.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from udmtrain.config import dump_yaml, load_recipe
from udmtrain.registry import FAMILY_MODULES

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted(p for p in (ROOT / "recipes").rglob("*.yaml") if "base" not in p.relative_to(ROOT / "recipes").parts)
FAMILY_MODULE_NAMES = {m for modules in FAMILY_MODULES.values() for m in modules}


def load_or_skip(path, *args, **kwargs):
    """``load_recipe``, skipping only if a registry family module is not written yet."""
    try:
        return load_recipe(str(path), *args, **kwargs)
    except ModuleNotFoundError as err:
        if err.name in FAMILY_MODULE_NAMES:
            pytest.skip(f"component module {err.name} does not exist yet")
        raise


def test_recipes_exist():
    assert set(PAPER) <= {p.stem for p in RECIPES}


PAPER = ("absorbing_udm", "mdlm", "udlm_loo", "udlm_denoiser_ce", "max_coupling", "ar")


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT / "recipes")))
def test_recipe_validates(path, tmp_path):
    """Every recipe validates on one process and round-trips through its resolved YAML."""
    world_size = 1
    rc = load_or_skip(path, world_size=world_size)
    assert rc.run.name != "unnamed", "every shipped recipe names its run"
    # the resolved recipe (what recipe.yaml in a checkpoint holds) loads back equal
    resolved = tmp_path / "recipe.yaml"
    resolved.write_text(dump_yaml(rc.to_dict()))
    assert load_recipe(str(resolved), world_size=world_size) == rc


@pytest.mark.parametrize("stem", PAPER)
@pytest.mark.parametrize("world_size", [8, 16, 32])
def test_paper_recipes_fit_multi_gpu_world_sizes(stem, world_size):
    """The paper's setting (docs/theory.md §6): global batch 512, 16 per GPU, 1M steps."""
    rc = load_or_skip(ROOT / "recipes" / f"{stem}.yaml", world_size=world_size)
    assert rc.train.max_steps == 1_000_000 and rc.engine.global_batch_size == 512
    assert rc.engine.micro_batch_size == 16 and rc.optim.cfg.lr == 3e-4


def test_paper_recipe_choices():
    expected = {
        "absorbing_udm": ("absorbing_uniform", "denoiser", "audm_nelbo", "ancestral"),
        "mdlm": ("masked", "denoiser", "mdlm_nelbo", "ancestral"),
        "udlm_loo": ("uniform", "loo", "plugin_nelbo", "ancestral"),
        "udlm_denoiser_ce": ("uniform", "denoiser", "cross_entropy", "ancestral"),
        "max_coupling": ("uniform", "denoiser", "max_coupling_nelbo", "max_coupling"),
    }
    for stem, (process, param, loss, sampler) in expected.items():
        rc = load_or_skip(ROOT / "recipes" / f"{stem}.yaml")
        assert (rc.process.name, rc.parameterization.name, rc.loss.name, rc.sampler.name) == \
            (process, param, loss, sampler), stem
        assert rc.model.name == "dit" and rc.model.cfg.hidden_size == 768 and rc.tokenizer.name == "gpt2"
    audm = load_or_skip(ROOT / "recipes" / "absorbing_udm.yaml")
    assert audm.model.cfg.noise_conditioning == "separate_linear"
    assert load_or_skip(ROOT / "recipes" / "mdlm.yaml").sampler.cfg.cache is True
    ar = load_or_skip(ROOT / "recipes" / "ar.yaml")
    assert ar.model.name == "ar_transformer" and ar.loss.name == "ar_nll"
    assert ar.process is ar.schedule is ar.parameterization is ar.sampler is None
