"""Every sampler driven by the exact posterior reproduces the data law (docs/theory.md §0 "Tests by enumeration").

Law: a random law over all 3**3 sequences; 4000 samples per sampler; Pearson chi-square against the
law with 26 degrees of freedom, threshold = the 1e-4 upper quantile (~62). A sampler whose per-step
factorisation error had not vanished, or that plugged the wrong object into its kernel, fails by far:
the negative controls (1-step MDLM, plug-in bridge fed the denoiser) score > 400 at the same size.
"""

from __future__ import annotations

import pytest
import torch
from sampler_helpers import L, V, build, chi2, chi2_quantile, histogram, law, network

BATCH, STEPS = 4000, 128
THRESHOLD = chi2_quantile(V**L - 1)

CASES = [
    # (sampler, process, parameterization, oracle kind, extra config)
    ("ancestral", "masked", "denoiser", None, {}),                       # MDLM (cached)
    ("ancestral", "masked", "denoiser", None, {"cache": False}),
    ("ancestral", "uniform", "loo", "loo", {}),                          # UDLM plug-in with the LOO
    ("ancestral", "uniform", "denoiser", "denoiser", {}),                # denoiser net -> LOO first
    ("max_coupling", "uniform", "denoiser", "denoiser", {}),
    ("max_coupling", "uniform", "loo", "loo", {}),
    ("ancestral", "absorbing_uniform", "denoiser", None, {}),            # AUDM
    ("reaudm", "absorbing_uniform", "denoiser", None, {}),               # ReAUDM
    ("remdm", "masked", "denoiser", None, {"sigma_schedule": "zero"}),
    ("remdm", "masked", "denoiser", None, {"sigma_schedule": "constant", "eta": 0.1}),
    ("remdm", "masked", "denoiser", None, {"sigma_schedule": "cap"}),
    ("remdm", "masked", "denoiser", None, {"sigma_schedule": "rescale", "eta_rescale": 0.5}),
    ("remdm", "masked", "denoiser", None, {"sigma_schedule": "loop", "loop_eta": 0.1}),
    ("remdm", "masked", "denoiser", None, {"sigma_schedule": "cap", "t_switch": 0.5}),
    ("pc_gibbs", "uniform", "loo", "loo", {"k_parallel": 1, "selection": "random"}),
    ("pc_gibbs", "absorbing_uniform", "denoiser", None, {"k_parallel": 1, "selection": "random"}),
    ("pc_gibbs", "absorbing_uniform", "denoiser", None,
     {"k_parallel": 1, "selection": "random", "predictor": "reaudm"}),
]


def _chi2_of(sampler, process, param, kind, cfg, seed=1):
    smp = build(sampler, process, param, **{"num_steps": STEPS, **cfg})
    data_law = law(0)
    out = smp.sample(network(process, data_law, kind), BATCH, L, torch.Generator().manual_seed(seed))
    return chi2(histogram(out.tokens_BL), data_law)


@pytest.mark.parametrize("sampler,process,param,kind,cfg", CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}-{'-'.join(f'{k}={v}' for k, v in c[4].items())}" for c in CASES])
def test_exact_posterior_reproduces_the_data_law(sampler, process, param, kind, cfg):
    stat = _chi2_of(sampler, process, param, kind, cfg)
    assert stat < THRESHOLD, f"chi2={stat:.1f} >= {THRESHOLD:.1f}"


def test_negative_controls_fail_the_same_check():
    # one MDLM step draws the positions independently: the product of the marginals, not the law
    assert _chi2_of("ancestral", "masked", "denoiser", None, {"num_steps": 1}) > 5 * THRESHOLD
    # a denoiser network declared as LOO plugs D into the bridge: over-sticky (docs/theory.md §10.8)
    assert _chi2_of("ancestral", "uniform", "loo", "denoiser", {}) > 3 * THRESHOLD
