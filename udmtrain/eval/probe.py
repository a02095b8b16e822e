"""Leave-one-out sensitivity probe (docs/theory.md §5.7): does the model's "LOO" really ignore the own token?

Legend: ``xt_BL`` LongTensor ``[B, L]`` state of a sampler trajectory; ``time_B`` float ``[B]`` (the
value is passed to ``loo_fn`` verbatim: t, alpha or sigma, whatever the caller's ``loo_fn`` expects);
``noise_BL`` the AUDM noise tokens or None; log-probs ``[B, L, V]``.

For each recorded state and each of ``num_trials`` trials, ``num_positions`` distinct positions are
drawn (the same for the whole batch). For each such position l, separately, the token z^l is replaced
by a token drawn uniformly among the V-1 *other* tokens (independently per sequence) and the LOO is
recomputed; the probe records

    TV_l = 1/2 * sum_v | Lo_pert(l, v) - Lo_base(l, v) |,

which is exactly 0 for a true leave-one-out posterior ``P(x^l | z^{-l})`` (it does not read z^l) and
positive for a model that leaks the own token (e.g. the denoiser). The per-step mean TV over the
batch, positions and trials is a checkpoint-quality curve.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

LooFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]
"""``loo_fn(xt_BL, time_B, noise_BL) -> LOO log-probs [B, L, V]`` (normalised)."""


@dataclass(frozen=True)
class ProbeState:
    """One state of a sampler trajectory: ``time_B`` float ``[B]``, ``xt_BL`` ``[B, L]``, ``noise_BL``."""

    time_B: torch.Tensor
    xt_BL: torch.Tensor
    noise_BL: torch.Tensor | None = None


class RecordingNetwork:
    """Wraps a diffusion network ``(xt_BL, sigma_B, noise_BL) -> logits`` and records every call as a
    ``ProbeState`` whose time is the network's ``sigma_B`` (so the probe's ``loo_fn`` takes sigma).

    Pass it to ``sampler.sample`` in place of the network, then ``loo_sensitivity_probe(loo_fn,
    recorder.states, ...)``. Corrector calls are recorded too."""

    def __init__(self, network: Callable[..., torch.Tensor]) -> None:
        self.network = network
        self.states: list[ProbeState] = []

    def __call__(self, xt_BL: torch.Tensor, sigma_B: torch.Tensor, noise_BL: torch.Tensor | None = None):
        self.states.append(ProbeState(sigma_B.detach().clone(), xt_BL.detach().clone(),
                                      None if noise_BL is None else noise_BL.detach().clone()))
        return self.network(xt_BL, sigma_B, noise_BL)


def _as_state(state: Any, index: int) -> ProbeState:
    if isinstance(state, ProbeState):
        st = state
    elif isinstance(state, (tuple, list)) and len(state) in (2, 3):
        st = ProbeState(*state)
    else:
        raise TypeError(f"probe state {index} must be a ProbeState or a (time, xt_BL[, noise_BL]) tuple, "
                        f"got {type(state).__name__}")
    xt_BL = st.xt_BL
    if xt_BL.dim() != 2:
        raise ValueError(f"probe state {index}: xt_BL must be [B, L], got shape {tuple(xt_BL.shape)}")
    time_B = torch.as_tensor(st.time_B, dtype=torch.float64, device=xt_BL.device)
    time_B = time_B.reshape(-1).expand(xt_BL.shape[0]) if time_B.numel() == 1 else time_B.reshape(-1)
    return ProbeState(time_B, xt_BL.long(), st.noise_BL)


@torch.no_grad()
def loo_sensitivity_probe(loo_fn: LooFn, states: Iterable[Any], *, vocab_size: int, num_positions: int = 5,
                          num_trials: int = 10, seed: int = 0, record_tokens: bool = False) -> dict:
    """Run the probe over a trajectory; returns a JSON-able dict.

    ``curve``: per-state mean TV; ``time``: per-state mean time value; ``steps``: per-state trace
    (positions probed per trial, TV per trial and position averaged over the batch, the base LOO
    argmax at the probed positions, and ``xt`` if ``record_tokens``); ``protocol``: every setting.
    Cost: ``1 + num_trials`` calls of ``loo_fn`` per state (the positions of a trial are batched).
    """
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be >= 2 to perturb a token, got {vocab_size}")
    generator = torch.Generator().manual_seed(seed)
    steps, curve, times = [], [], []
    for k, raw in enumerate(states):
        st = _as_state(raw, k)
        B, L = st.xt_BL.shape
        device = st.xt_BL.device
        P = min(num_positions, L)
        base_BLV = loo_fn(st.xt_BL, st.time_B, st.noise_BL)
        if base_BLV.shape[:2] != (B, L):
            raise ValueError(f"loo_fn returned shape {tuple(base_BLV.shape)} for a state of shape {(B, L)}")
        base_prob_BLV = base_BLV.double().exp()
        trials = []
        for _ in range(num_trials):
            pos_P = torch.randperm(L, generator=generator)[:P]
            shift_PB = torch.randint(1, vocab_size, (P, B), generator=generator)  # never 0: a different token
            pert_PBL = st.xt_BL.unsqueeze(0).repeat(P, 1, 1)
            p_idx = torch.arange(P)
            pert_PBL[p_idx, :, pos_P] = (pert_PBL[p_idx, :, pos_P] + shift_PB.to(device)) % vocab_size
            noise = None if st.noise_BL is None else st.noise_BL.repeat(P, 1)
            out_PBLV = loo_fn(pert_PBL.reshape(P * B, L), st.time_B.repeat(P), noise).reshape(P, B, L, -1)
            pos_dev = pos_P.to(device)
            pert_PBV = out_PBLV[p_idx.to(device), :, pos_dev].double().exp()
            base_PBV = base_prob_BLV[:, pos_dev].transpose(0, 1)
            tv_PB = 0.5 * (pert_PBV - base_PBV).abs().sum(-1)
            trials.append({"positions": pos_P.tolist(), "tv": tv_PB.mean(-1).cpu().tolist(),
                           "tv_max": float(tv_PB.max()),
                           "argmax_base": base_PBV.argmax(-1).cpu().tolist()})
        all_tv = [v for tr in trials for v in tr["tv"]]
        mean_tv = sum(all_tv) / len(all_tv) if all_tv else float("nan")
        entry = {"step": k, "time": float(st.time_B.mean()), "mean_tv": mean_tv,
                 "max_tv": max((tr["tv_max"] for tr in trials), default=float("nan")), "trials": trials}
        if record_tokens:
            entry["xt"] = st.xt_BL.cpu().tolist()
        steps.append(entry)
        curve.append(mean_tv)
        times.append(entry["time"])
    return {"curve": curve, "time": times, "mean_tv": sum(curve) / len(curve) if curve else float("nan"),
            "steps": steps,
            "protocol": {"num_positions": num_positions, "num_trials": num_trials, "seed": seed,
                         "vocab_size": vocab_size, "num_states": len(steps),
                         "perturbation": "one position at a time, same position for the batch, token "
                                         "replaced uniformly among the V-1 other tokens",
                         "distance": "TV = 1/2 ||Lo_pert - Lo_base||_1 at the perturbed position"}}


def plot_probe_curve(results: dict | Sequence[tuple[str, dict]], png_path: str | os.PathLike,
                     *, x: str = "step") -> None:
    """PNG of the mean TV per state (``x`` = ``"step"`` or ``"time"``); ``results`` is one probe
    result or a list of ``(label, result)`` pairs (e.g. one per checkpoint)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    pairs = [("probe", results)] if isinstance(results, dict) else list(results)
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, res in pairs:
        xs = list(range(len(res["curve"]))) if x == "step" else res["time"]
        ax.plot(xs, res["curve"], marker="o", label=f"{label} (mean {res['mean_tv']:.3g})")
    ax.set_xlabel("sampler step" if x == "step" else "time value")
    ax.set_ylabel("mean TV(Lo_pert, Lo_base)")
    ax.set_title("LOO sensitivity probe (0 for a true LOO)")
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.fspath(png_path), dpi=120)
    plt.close(fig)
