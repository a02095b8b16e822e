"""Sampling throughput as JSON: NFE/s and tokens/s of any sampler on any recipe's model, with the time
split between the network and the sampler around it.

    python tools/bench.py sample --recipe recipes/udlm_loo.yaml --vocab-size 4096 --batch-size 8 \\
        --seq-len 128 --steps 16 model.hidden_size=256 model.num_blocks=8 model.num_heads=8
    python tools/bench.py sample --ckpt runs/quickstart-audm --sampler ancestral,reaudm,pc_gibbs --repeats 5

The model is the recipe's network with random weights (``--recipe``; its zero-initialised adaLN and
head are re-drawn, N(0, 0.02), so predictions are not uniform) or a checkpoint's EMA weights
(``--ckpt``), run under the recipe's precision (``engine.precision: bf16`` -> bf16 autocast, on CPU
too). ``--sampler`` takes one or several comma-separated sampler names; they are timed interleaved
(``repeats`` rounds, one ``sample`` call of each per round, after ``--warmup`` untimed rounds), so a
shared, noisy machine slows them alike, and the report gives each one's median and all raw values.

Per sampler: ``nfe_per_s`` (network calls per second), ``tokens_per_s`` (generated tokens per second,
``batch x seq_len`` per call), ``step_time_s`` (seconds per NFE), ``network_s_per_nfe`` (the network
call alone: the callable is wrapped and timed, synchronised on CUDA) and ``overhead_fraction`` =
``1 - network / total``, the share of a step spent in the sampler (parameterization, temperature,
the kernel's draws).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Add the sampling-bench options to ``parser`` (or a new one); ``tools/bench.py sample`` reuses it."""
    p = parser or argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--recipe", help="recipe YAML: its network with random weights")
    src.add_argument("--ckpt", help="a run / checkpoint directory: its EMA weights and saved recipe")
    p.add_argument("--sampler", default=None, help="sampler name(s), comma-separated (default: the recipe's)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per sample call (default 8)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: data.seq_len)")
    p.add_argument("--steps", type=int, default=16, help="sampler.num_steps, i.e. NFE per call (default 16)")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="--recipe only: tokenizer size V (default: from the recipe's shards / tokenizer)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (default 3; the median is reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the JSON report to this file")
    p.add_argument("overrides", nargs="*", help="dotted recipe overrides, e.g. engine.precision=fp32")
    return p


class TimedNetwork:
    """``network`` with the wall time of its calls summed in ``seconds`` (CUDA synchronised)."""

    def __init__(self, network: Any, device: Any) -> None:
        self.network, self.device, self.seconds = network, device, 0.0

    def _sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self._sync()
        t0 = time.perf_counter()
        out = self.network(*args, **kwargs)
        self._sync()
        self.seconds += time.perf_counter() - t0
        return out

    def parameters(self):
        """The wrapped module's parameters (the sampler reads the device from them)."""
        params = getattr(getattr(self.network, "module", self.network), "parameters", None)
        return params() if callable(params) else iter(())


def _randomise_zero_init(model: Any, seed: int) -> None:
    """Re-draw the zero-initialised adaLN / head weights N(0, 0.02) so the random network's predictions
    are not uniform (a uniform prediction would let some samplers take shortcuts, e.g. caches)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 1 and not bool(p.any()):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


def load_model(args: argparse.Namespace, device: Any) -> tuple[Any, Any, Any, Any]:
    """``(cfg, components, network, make_sampler)`` for ``--recipe`` (random weights) or ``--ckpt``;
    ``make_sampler(name)`` builds sampler ``name`` from the same recipe and ``args.overrides``."""
    import torch

    from udmtrain.config import load_recipe
    from udmtrain.train.components import NetworkCall, build_components, build_sampler

    if args.ckpt:
        from udmtrain.train.inference import load_for_inference, with_sampler

        loaded = load_for_inference(args.ckpt, args.overrides, device=device)

        def make_ckpt_sampler(name: str) -> Any:
            return with_sampler(loaded, [f"sampler.name={name}", *args.overrides]).components.sampler

        return loaded.cfg, loaded.components, loaded.network(), make_ckpt_sampler
    cfg = load_recipe(args.recipe, list(args.overrides))
    if cfg.process is None:
        raise ValueError(f"{args.recipe} is an autoregressive recipe; the sampling bench needs a diffusion one")
    vocab = args.vocab_size
    if vocab is None:
        from udmtrain.data.manifest import check_manifest
        from udmtrain.train.components import resolve_vocab_size

        vocab = resolve_vocab_size(cfg, check_manifest(cfg.data, expected_tokenizer=cfg.tokenizer))
    comp = build_components(cfg, int(vocab), with_sampler=False)
    model = comp.model
    _randomise_zero_init(model, args.seed)
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)

    def make_recipe_sampler(name: str) -> Any:
        sub = load_recipe(args.recipe, [f"sampler.name={name}", *args.overrides])
        return build_sampler(sub.sampler, comp)

    return cfg, comp, NetworkCall(model, cfg.engine.precision, torch.device(device)), make_recipe_sampler


def run_sample_bench(args: argparse.Namespace) -> dict[str, Any]:
    """Time ``args.repeats`` interleaved rounds of every sampler; returns the JSON report."""
    import torch

    if args.repeats < 1 or args.warmup < 0 or args.batch_size < 1 or args.steps < 1:
        raise ValueError(f"--repeats {args.repeats} and --batch-size/--steps must be >= 1, --warmup >= 0")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.overrides = [*args.overrides, f"sampler.num_steps={args.steps}"]
    cfg, comp, network, make_sampler = load_model(args, device)
    names = args.sampler.split(",") if args.sampler else ([cfg.sampler.name] if cfg.sampler is not None else [])
    if not names:
        raise ValueError("the recipe names no sampler; pass --sampler NAME")
    seq_len = int(args.seq_len or cfg.data.seq_len)
    samplers = {name: make_sampler(name) for name in names}
    raw: dict[str, list[tuple[float, float, int]]] = {n: [] for n in samplers}
    timed = TimedNetwork(network, device)
    total = args.warmup + args.repeats
    t_start = time.perf_counter()
    with torch.no_grad():
        for rnd in range(total):
            for name, sampler in samplers.items():
                gen = torch.Generator(device=device).manual_seed(args.seed + rnd)
                timed.seconds = 0.0
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                out = sampler.sample(timed, args.batch_size, seq_len, gen)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                seconds = time.perf_counter() - t0
                if rnd >= args.warmup:
                    raw[name].append((seconds, timed.seconds, int(out.nfe)))
            done = rnd + 1
            eta = (time.perf_counter() - t_start) / done * (total - done)
            print(f"[bench sample] round {done}/{total} ({'warmup' if rnd < args.warmup else 'timed'}), "
                  f"ETA {eta:.0f}s", file=sys.stderr, flush=True)
    results = {}
    for name, runs in raw.items():
        per = [{"seconds": s, "network_s": n, "nfe": k, "nfe_per_s": k / s, "tokens_per_s": args.batch_size * seq_len / s,
                "overhead_fraction": 1.0 - n / s} for s, n, k in runs]
        med = lambda key: statistics.median(r[key] for r in per)  # noqa: E731
        nfe = statistics.median(r["nfe"] for r in per)
        results[name] = {
            "nfe": nfe, "nfe_per_s": med("nfe_per_s"), "tokens_per_s": med("tokens_per_s"),
            "step_time_s": statistics.median(r["seconds"] / max(r["nfe"], 1) for r in per),
            "network_s_per_nfe": statistics.median(r["network_s"] / max(r["nfe"], 1) for r in per),
            "overhead_fraction": med("overhead_fraction"), "runs": per,
        }
    from bench import device_name  # tools/bench.py (this directory is on sys.path through it)

    return {"bench": "sample", "recipe": args.recipe, "ckpt": args.ckpt, "overrides": args.overrides,
            "model": cfg.model.name, "process": cfg.process.name, "parameterization": cfg.parameterization.name,
            "precision": cfg.engine.precision, "device": device_name(device), "batch_size": args.batch_size,
            "seq_len": seq_len, "num_states": int(comp.process.num_states), "steps": args.steps,
            "repeats": args.repeats, "warmup": args.warmup, "samplers": results,
            "torch_version": torch.__version__}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    report = run_sample_bench(args)
    from bench import emit  # tools/bench.py

    emit(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
