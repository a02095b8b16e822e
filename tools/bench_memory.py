"""Peak host memory of the training loss path (logits -> loss -> backward) per token, as JSON.

    python tools/bench.py memory --vocab-size 50257 --batch-size 2 --seq-len 512 \\
        --cases uniform:loo:plugin_nelbo,masked:denoiser:mdlm_nelbo --chunk-elements 0,67108864

Each (case, chunk setting) runs in a fresh Python subprocess (so ``ru_maxrss`` is that run's own peak):
it allocates the network's logits ``[B, L, V]`` as a leaf in the recipe dtype (``--dtype bf16``: what
bf16 autocast hands the objective), runs ``DiffusionObjective`` forward and backward once, and reports
``peak_rss_bytes - baseline_rss_bytes`` (the baseline is taken right after the logits exist, so the
network's own activations are not counted) and that delta per token. ``--chunk-elements 0`` forces the
reference (unsliced) path; a positive value is the objective's ``chunk_elements`` (the default is
``udmtrain.diffusion.objective.CHUNK_ELEMENTS``). One float32 ``[B, L, V]`` is ``4 B L V`` bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Add the memory-bench options to ``parser`` (or a new one); ``tools/bench.py memory`` reuses it."""
    p = parser or argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab-size", type=int, default=50257)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="logits dtype (default bf16)")
    p.add_argument("--cases", default="uniform:loo:plugin_nelbo,masked:denoiser:mdlm_nelbo,"
                   "absorbing_uniform:denoiser:audm_nelbo", help="process:parameterization:loss, comma-separated")
    p.add_argument("--chunk-elements", default="0,default",
                   help="comma-separated chunk_elements settings: 0 = unsliced reference, default, or a number")
    p.add_argument("--out", default=None, help="also write the JSON report to this file")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p


def _rss_bytes() -> int:
    """Current resident set size (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm", encoding="ascii") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One measurement in this (fresh) process: build, baseline, forward + backward, peak."""
    import torch

    from udmtrain.diffusion.objective import CHUNK_ELEMENTS, DiffusionObjective
    from udmtrain.diffusion.time_sampling import antithetic_times
    from udmtrain.registry import LOSS, PARAMETERIZATION, PROCESS, SCHEDULE

    torch.set_num_threads(1)
    proc_name, param_name, loss_name = spec["case"].split(":")
    proc = PROCESS.build(proc_name, vocab_size=spec["vocab_size"])
    chunk = spec["chunk_elements"]
    chunk = CHUNK_ELEMENTS if chunk == "default" else (1 << 62 if int(chunk) == 0 else int(chunk))
    obj = DiffusionObjective(SCHEDULE.build("loglinear"), proc, PARAMETERIZATION.build(param_name, process=proc),
                             LOSS.build(loss_name, process=proc), chunk_elements=chunk)
    B, L, V = spec["batch_size"], spec["seq_len"], proc.num_states
    gen = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if spec["dtype"] == "bf16" else torch.float32
    # warm-up on 8 positions through the same code path (sliced or not): first-call allocations and lazy
    # initialisation are not the loss path's memory
    small = torch.zeros(1, 8, V, dtype=dtype, requires_grad=True)
    chunk_before = obj.chunk_elements
    obj.chunk_elements = 1 if chunk < (1 << 62) else chunk
    obj(lambda *a, **k: small, torch.zeros(1, 8, dtype=torch.long), torch.ones(1, 8, dtype=torch.bool),
        antithetic_times(1, 0, 1), gen).loss.backward()
    obj.chunk_elements = chunk_before
    logits = torch.randn(B, L, V, generator=gen, dtype=dtype).requires_grad_(True)
    x0 = torch.randint(0, spec["vocab_size"], (B, L), generator=gen)
    valid = torch.ones(B, L, dtype=torch.bool)
    t0 = time.perf_counter()
    base = max(_rss_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    out = obj(lambda *a, **k: logits, x0, valid, antithetic_times(B, 0, 1), gen)
    out.loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    delta = max(0, peak - base)
    return {"case": spec["case"], "chunk_elements": chunk if chunk < (1 << 62) else 0, "batch_size": B,
            "seq_len": L, "num_states": V, "dtype": spec["dtype"], "loss": float(out.loss),
            "peak_delta_bytes": delta, "peak_delta_bytes_per_token": delta / (B * L),
            "fp32_BLV_bytes": 4 * B * L * V, "peak_delta_in_fp32_BLV": delta / (4 * B * L * V),
            "seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    specs = [{"case": c, "chunk_elements": k, "vocab_size": args.vocab_size, "batch_size": args.batch_size,
              "seq_len": args.seq_len, "dtype": args.dtype}
             for c in args.cases.split(",") for k in args.chunk_elements.split(",")]
    rows, t0 = [], time.perf_counter()
    for i, spec in enumerate(specs):
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-2000:], file=sys.stderr)
            raise RuntimeError(f"memory bench child for {spec} failed (exit {proc.returncode})")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        eta = (time.perf_counter() - t0) / (i + 1) * (len(specs) - i - 1)
        print(f"[bench memory] {i + 1}/{len(specs)} {spec['case']} chunk={spec['chunk_elements']}: "
              f"{rows[-1]['peak_delta_bytes'] / 2**20:.0f} MiB, ETA {eta:.0f}s", file=sys.stderr, flush=True)
    from bench import emit  # tools/bench.py

    emit({"bench": "memory", "rows": rows}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
