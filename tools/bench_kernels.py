"""In-process A/B of one UDLM reverse step: the network call, then the sampler's part (LOO log-probs,
``exp``, the kernel's draw), with the kernel either the library's exact inverse-CDF mixture draw or the
float64 Gumbel-argmax over the formed bridge (what the reference and udmtrain before this change did).
Interleaved in one process (A, B, A, B, ...), the median of ``--repeats`` rounds, as JSON.

    python tools/bench_kernels.py --precision fp32 --repeats 5 --out kernels_fp32.json

Sizes: DiT 256 wide, 8 blocks, 8 heads (``recipes/udlm_loo.yaml`` with overrides), batch 8 x 128, V = 4096,
random weights (the zero-initialised layers re-drawn as in ``bench.py sample``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tools/bench.py (emit) beside this file


def gumbel_bridge_step(loo_probs_BLV, z_BL, alpha_t_B1, alpha_s_B1, generator):
    """Reference kernel: form the float64 bridge ``[B, L, V]``, then ``argmax(log p + Gumbel)`` with V
    float64 uniforms per position."""
    import torch

    from udmtrain.diffusion import functional as F

    probs = F.uniform_bridge(loo_probs_BLV.to(torch.float64), z_BL, alpha_t_B1, alpha_s_B1)
    u = torch.rand(probs.shape, generator=generator, dtype=torch.float64).clamp_min_(torch.finfo(torch.float64).tiny)
    return torch.argmax(torch.log(probs) - torch.log(-torch.log(u)), dim=-1)


def main(argv: list[str] | None = None) -> int:
    import torch

    from bench import emit
    from bench_sample import _randomise_zero_init
    from udmtrain.config import load_recipe
    from udmtrain.diffusion.process import uniform_plugin_step
    from udmtrain.train.components import NetworkCall, build_components

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    cfg = load_recipe("recipes/udlm_loo.yaml", ["model.hidden_size=256", "model.num_blocks=8", "model.num_heads=8",
                                                "model.dropout=0.0", f"engine.precision={args.precision}"])
    comp = build_components(cfg, 4096, with_sampler=False)
    model = comp.model.eval()
    _randomise_zero_init(model, 0)
    net = NetworkCall(model, args.precision, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    z = torch.randint(0, 4096, (8, 128), generator=gen)
    sigma = torch.full((8,), 0.5)
    a_t, a_s = torch.full((8, 1), 0.4, dtype=torch.float64), torch.full((8, 1), 0.5, dtype=torch.float64)
    kernels = {"gumbel_reference": gumbel_bridge_step, "inverse_cdf": uniform_plugin_step}
    raw: dict[str, list[tuple[float, float]]] = {k: [] for k in kernels}
    with torch.no_grad():
        for rnd in range(args.repeats + 1):  # round 0 is warm-up
            for name, kernel in kernels.items():
                t0 = time.perf_counter()
                logits = net(z, sigma, None)
                t1 = time.perf_counter()
                loo = comp.parameterization.loo_logp(logits.float(), z, a_t.float(), None)
                kernel(loo.exp(), z, a_t, a_s, gen)
                t2 = time.perf_counter()
                if rnd:
                    raw[name].append((t1 - t0, t2 - t1))
            print(f"[bench kernels] round {rnd}/{args.repeats}", file=sys.stderr, flush=True)
    report = {"bench": "kernels", "precision": args.precision, "batch": 8, "seq_len": 128, "vocab": 4096,
              "repeats": args.repeats}
    for name, runs in raw.items():
        net_s, smp_s = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
        report[name] = {"network_s": net_s, "sampler_s": smp_s, "sampler_over_network": smp_s / net_s, "runs": runs}
    report["sampler_speedup"] = report["gumbel_reference"]["sampler_s"] / report["inverse_cdf"]["sampler_s"]
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
