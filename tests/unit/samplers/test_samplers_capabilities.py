"""Samplers need process capabilities (one vocabulary), checked at config time and at construction."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from sampler_helpers import L, V, build, chi2, chi2_quantile, histogram, law, network

from udmtrain.config import ConfigError, load_recipe
from udmtrain.diffusion.process import CAPABILITIES, ForwardProcess
from udmtrain.registry import PROCESS, SAMPLER

REPO = Path(__file__).resolve().parents[3]


def test_every_declared_and_needed_word_is_in_the_vocabulary():
    for name in PROCESS.names():
        assert PROCESS.get(name).capabilities <= set(CAPABILITIES), name
    for name in SAMPLER.names():
        cls = SAMPLER.get(name)
        assert cls.required_capabilities(cls.Config()) <= set(CAPABILITIES), name


def test_unknown_capability_word_is_refused_at_class_definition():
    with pytest.raises(TypeError, match=r"unknown capabilities \['loo'\]"):
        type("Bad", (ForwardProcess,), {"capabilities": frozenset({"loo"})})


@pytest.mark.parametrize("recipe,overrides,needed", [
    ("udlm_loo.yaml", ["sampler.name=remdm"], "['mask_state']"),
    ("mdlm.yaml", ["sampler.name=pc_gibbs"], "['gibbs_corrector']"),
    ("absorbing_udm.yaml", ["sampler.name=pc_gibbs", "sampler.predictor=max_coupling", "sampler.temperature_on=loo"],
     "['loo_posterior']"),
    ("mdlm.yaml", ["sampler.temperature_on=loo"], "['loo_posterior']"),
])
def test_unsupported_combination_is_refused_at_config_time(recipe, overrides, needed):
    with pytest.raises(ConfigError) as info:
        load_recipe(str(REPO / "recipes" / recipe), overrides)
    (issue,) = [i for i in info.value.issues if i.path == "sampler.name"]
    assert f"needs process capabilities {needed}" in issue.message and "process.name=" in issue.message


def test_the_constructor_makes_the_same_check():
    with pytest.raises(ValueError, match=r"sampler 'reaudm' works with process \['absorbing_uniform'\], not "
                                         r"'masked': it needs the process capabilities \['noise_tokens'\]"):
        build("reaudm", "masked")


def test_max_coupling_on_the_absorbing_uniform_process_reproduces_the_law():
    # the kernel preserves q_s(.|x) for alpha e_x + (1 - alpha) e_n as well (n carried unchanged)
    smp = build("max_coupling", "absorbing_uniform", num_steps=128)
    data = law(0)
    out = smp.sample(network("absorbing_uniform", data), 4000, L, torch.Generator().manual_seed(1))
    assert chi2(histogram(out.tokens_BL), data) < chi2_quantile(V**L - 1)
    assert out.noise_BL is not None
