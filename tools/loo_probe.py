"""Leave-one-out sensitivity probe of a uniform-process checkpoint along a sampler trajectory (docs/theory.md §5.7).

    python tools/loo_probe.py --ckpt runs/udlm --out-dir probe/
    python tools/loo_probe.py --ckpt runs/udlm/checkpoints/step_0000010000 --steps 32 --num-samples 8 \\
        --positions 5 --trials 10 --seed 0 --out-dir probe/ sampler.name=ancestral

Samples with the recipe's sampler (``--steps`` network calls) while recording every state the network
sees, then for each state perturbs ``--positions`` single positions per trial (``--trials`` trials) and
measures TV(Lo_pert, Lo_base) at the perturbed position: 0 for a true leave-one-out posterior, > 0 for
a model that reads its own token. Writes ``probe.json`` (curve, per-step trace, protocol) and
``probe.png``. Only models with an LOO posterior, i.e. the uniform process, can be probed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from udmtrain.train import inference as inf  # noqa: E402
from udmtrain.utils.argtypes import device_name, positive_int  # noqa: E402
from udmtrain.utils.io import check_writable, write_text_atomic  # noqa: E402
from udmtrain.utils.progress import counting, progress  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="run dir, its checkpoints/ dir, a step_XXXXXXXXXX dir, or an export "
                                                 "of tools/export_ckpt.py")
    p.add_argument("--steps", type=positive_int, default=None, help="sampler.num_steps (default: the recipe's)")
    p.add_argument("--num-samples", type=positive_int, default=4, help="batch size of the probed trajectory")
    p.add_argument("--positions", type=positive_int, default=5, help="positions perturbed per trial")
    p.add_argument("--trials", type=positive_int, default=10, help="trials per recorded state")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--device", type=device_name, default=None, help="cpu | cuda[:i] (default: cuda when available)")
    p.add_argument("--out-dir", required=True, help="where probe.json and probe.png go")
    return p


def loo_fn_for(loaded: inf.Loaded):
    """``(xt_BL, sigma_B, noise_BL) -> log Lo [B, L, V]`` with ``alpha = exp(-sigma)`` (docs/theory.md §1)."""
    import torch

    network, param = loaded.network(), loaded.components.parameterization

    def loo_fn(xt_BL, sigma_B, noise_BL):
        with torch.no_grad():
            logits_BLV = network(xt_BL, sigma_B.float(), noise_BL).float()
            alpha_B1 = torch.exp(-sigma_B.double()).float()[:, None]
            return param.loo_logp(logits_BLV, xt_BL, alpha_B1, noise_BL)

    return loo_fn


def main(argv: list[str] | None = None) -> int:
    import torch

    from udmtrain.eval.probe import RecordingNetwork, loo_sensitivity_probe, plot_probe_curve

    args, unknown = build_parser().parse_known_args(argv)
    check_writable(args.out_dir, "--out-dir", directory=True)
    overrides = ([f"sampler.num_steps={args.steps}"] if args.steps else []) + inf.split_overrides(unknown)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    inf.require_diffusion_run(args.ckpt, "tools/loo_probe.py")  # before --steps meets an AR recipe's empty sampler
    loaded = inf.load_for_inference(args.ckpt, overrides, use_ema=not args.no_ema, device=device)
    if args.positions > loaded.cfg.data.seq_len:
        raise inf.InferenceError(f"--positions {args.positions} exceeds the sequence length {loaded.cfg.data.seq_len} "
                          f"of {loaded.step_dir}; use at most {loaded.cfg.data.seq_len}")
    if not (loaded.components.is_diffusion and loaded.components.process.supports_loo):
        name = loaded.cfg.process.name if loaded.cfg.process is not None else "none (AR model)"
        raise inf.InferenceError(f"the LOO probe needs a model with a leave-one-out posterior (the uniform "
                                 f"process or another declaring 'loo_posterior'); {loaded.step_dir} uses process {name!r}")
    recorder = RecordingNetwork(loaded.network())
    with inf.sampling_progress(loaded, args.num_samples, args.num_samples, "sampling the probed trajectory") as bar:
        drawn = inf.draw_samples(loaded, args.num_samples, args.num_samples, args.seed,
                                 network=counting(recorder, bar.update))
    with progress(len(recorder.states), f"probing ({1 + args.trials} network calls per state)", unit="state") as bar:
        result = loo_sensitivity_probe(loo_fn_for(loaded), bar.wrap(recorder.states), vocab_size=loaded.vocab_size,
                                       num_positions=args.positions, num_trials=args.trials, seed=args.seed)
    result["protocol"].update({"model": loaded.protocol(), "sampler": inf.sampler_settings(loaded),
                               "num_samples": args.num_samples, "sample_seed": args.seed, "nfe": drawn["nfe"],
                               "time_value": "network sigma = -log alpha_t"})
    os.makedirs(args.out_dir, exist_ok=True)
    write_text_atomic(os.path.join(args.out_dir, "probe.json"), json.dumps(result, indent=2) + "\n")
    plot_probe_curve([(f"step {loaded.step}", result)], os.path.join(args.out_dir, "probe.png"))
    print(json.dumps({"mean_tv": result["mean_tv"], "curve": result["curve"],
                      "json": os.path.join(args.out_dir, "probe.json")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(inf.run_cli(main, sys.argv[1:]))
