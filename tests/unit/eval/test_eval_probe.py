"""eval/probe.py: an exact LOO gives TV 0, the exact denoiser does not (brute-force oracle, V=4, L=3)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from udmtrain.eval.probe import ProbeState, RecordingNetwork, loo_sensitivity_probe, plot_probe_curve


def load_oracle():
    path = Path(__file__).resolve().parents[2] / "enum_oracle.py"
    if not path.exists():
        pytest.skip(f"{path} (the enumeration oracle) is not there")
    spec = importlib.util.spec_from_file_location("enum_oracle_for_probe", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


V, L, B = 4, 3, 5


def trajectory(seed=0):
    """Random states at decreasing alpha (the 'time' passed to loo_fn is alpha itself here)."""
    g = torch.Generator().manual_seed(seed)
    return [ProbeState(torch.full((B,), alpha, dtype=torch.float64), torch.randint(0, V, (B, L), generator=g))
            for alpha in (0.1, 0.4, 0.7, 0.95)]


def test_exact_loo_has_zero_tv_and_denoiser_does_not():
    oracle = load_oracle()
    law = oracle.random_law(V, L, seed=3, concentration=0.3)
    calls = []

    def loo_fn(xt_BL, alpha_B, noise_BL):
        calls.append(xt_BL.clone())
        return oracle.exact_loo(law, V, L, xt_BL, alpha_B)

    def den_fn(xt_BL, alpha_B, noise_BL):
        return oracle.exact_denoiser(law, V, L, xt_BL, alpha_B)

    states = trajectory()
    loo = loo_sensitivity_probe(loo_fn, states, vocab_size=V, num_positions=2, num_trials=3, seed=1)
    den = loo_sensitivity_probe(den_fn, states, vocab_size=V, num_positions=2, num_trials=3, seed=1)
    assert max(loo["curve"]) < 1e-12
    assert min(den["curve"]) > 1e-3 and den["mean_tv"] > 1e-2
    # the own token matters more when less noise: TV grows with alpha for the denoiser
    assert den["curve"][-1] > den["curve"][0]
    # cost and perturbation: 1 + trials calls per state; each perturbed copy differs from the base
    # state at exactly one position (the same for the whole copy), with a different token
    assert len(calls) == len(states) * (1 + 3)
    base, pert = calls[0], calls[1].reshape(2, B, L)
    for p in range(2):
        diff_BL = pert[p] != base
        assert bool((diff_BL.sum(-1) == 1).all())
        assert diff_BL.any(0).sum() == 1
    assert loo["protocol"]["num_trials"] == 3 and len(loo["steps"]) == len(states)
    json.dumps(den)


def test_recording_network_and_plot(tmp_path):
    seen = []
    net = RecordingNetwork(lambda xt, sigma, noise: seen.append(1) or torch.zeros(*xt.shape, V))
    xt = torch.zeros(2, L, dtype=torch.long)
    net(xt, torch.tensor([0.5, 0.5]))
    xt += 1  # the recorder keeps a copy, not a view
    assert len(seen) == 1 and int(net.states[0].xt_BL.sum()) == 0
    uniform = lambda xt_BL, t_B, n: torch.full((*xt_BL.shape, V), -torch.log(torch.tensor(float(V))))  # noqa: E731
    res = loo_sensitivity_probe(uniform, net.states + [(0.3, xt)], vocab_size=V, record_tokens=True)
    assert res["curve"] == [0.0, 0.0] and res["steps"][1]["xt"] == xt.tolist()
    plot_probe_curve([("a", res), ("b", res)], tmp_path / "probe.png", x="time")
    assert (tmp_path / "probe.png").read_bytes().startswith(b"\x89PNG")
    with pytest.raises(TypeError, match="probe state 0"):
        loo_sensitivity_probe(uniform, [xt], vocab_size=V)
