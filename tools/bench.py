"""Benchmarks as JSON: training throughput and MFU of a recipe, sampling speed, or data-loader throughput.

    python tools/bench.py train --recipe recipes/quickstart.yaml --steps 20 --warmup 3
    python tools/bench.py train --recipe recipes/mdlm.yaml engine.micro_batch_size=8 --out mdlm.json
    deepspeed --num_gpus 8 tools/bench.py train --recipe recipes/absorbing_udm.yaml engine.zero_stage=3
    python tools/bench.py data --shards data/demo --batch-size 32 --num-batches 200
    python tools/bench.py sample --recipe recipes/udlm_loo.yaml --vocab-size 4096 --seq-len 128  (tools/bench_sample.py)
    python tools/bench.py memory --vocab-size 50257 --batch-size 2 --seq-len 512      (tools/bench_memory.py)

``train`` builds the recipe's run in-process with ``udmtrain.train.build.build_trainer`` (the real
engine, data loader and TrainStep; a temporary run directory, no resume, no checkpoint written), runs
``--warmup`` optimizer steps, then times ``--steps`` more. Reported (rank 0 prints; ``--out`` writes):

* ``tokens_per_s``: valid tokens of all ranks per second over the timed steps;
* ``step_time_s`` and its split ``time_split_s`` (data / forward / backward / optimizer, per step,
  from ``udmtrain.train.metrics.StepTimer``);
* ``flops_per_token``: training FLOPs per token ``6 N_matmul + 12 L D T`` (``udmtrain.models.flops``);
* ``peak_flops``: the device's peak per device in the run's precision, ``peak_flops_bf16`` and
  ``peak_flops_fp32`` both (datasheet for known GPUs, a matmul probe otherwise);
* ``mfu = flops_per_token * tokens_per_s / (peak_flops * world_size)``.

``--compare-bare`` (single process) also builds the bare step of ``tools/bench_bare.py`` (the same
network, objective, batches and AdamW, no engine / veto / EMA / timers) and times the two interleaved,
one optimizer step each in turn, so machine noise hits both alike; ``bare`` reports its tokens/s and
``full_over_bare`` the ratio of median step times (1.05 = the full step costs 5% more).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    train = sub.add_parser("train", help="training throughput and MFU of a recipe")
    train.add_argument("--recipe", required=True, help="recipe YAML")
    from udmtrain.utils.argtypes import nonnegative_int, positive_int

    train.add_argument("--steps", type=positive_int, default=10, help="timed optimizer steps (default 10)")
    train.add_argument("--warmup", type=nonnegative_int, default=2, help="untimed optimizer steps first (default 2)")
    train.add_argument("--out", default=None, help="also write the JSON report to this file")
    train.add_argument("--compare-bare", action="store_true",
                       help="also time the bare network + loss + AdamW step (tools/bench_bare.py), interleaved")
    train.add_argument("overrides", nargs="*", help="dotted recipe overrides, e.g. engine.zero_stage=3")
    sub.add_parser("data", help="data loader throughput (tools/bench_data.py)", add_help=False)
    sub.add_parser("memory", help="peak memory of the loss path per token (tools/bench_memory.py)", add_help=False)
    sub.add_parser("sample", help="sampler NFE/s, tokens/s and network/sampler split (tools/bench_sample.py)",
                   add_help=False)
    return parser


def device_name(device: Any) -> str:
    """``torch.cuda.get_device_name`` on CUDA; the CPU model (``/proc/cpuinfo``) with its core count otherwise."""
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def model_size(cfg: Any) -> tuple[int, float]:
    """``(parameters, training FLOPs per token)`` of the recipe's network, built on the meta device
    (exact under ZeRO-3 too, whose live modules hold empty partitions)."""
    import torch

    from udmtrain.models.flops import flops_per_token, num_params
    from udmtrain.data.manifest import check_manifest
    from udmtrain.train.build import build_components, resolve_vocab_size

    vocab = resolve_vocab_size(cfg, check_manifest(cfg.data, expected_tokenizer=cfg.tokenizer))
    with torch.device("meta"):
        model = build_components(cfg, vocab, with_sampler=False).model
    return num_params(model), flops_per_token(model, cfg.data.seq_len)


def run_train_bench(recipe: str, overrides: list[str], steps: int, warmup: int,
                    compare_bare: bool = False) -> dict[str, Any]:
    """Build the run, ``warmup`` untimed steps, ``steps`` timed ones; returns the report (every rank)."""
    from importlib.metadata import version

    import torch

    from udmtrain.config import load_recipe
    from udmtrain.train.build import build_trainer
    from udmtrain.train.metrics import measure_peak_flops, mfu

    if steps < 1 or warmup < 0:
        raise ValueError(f"--steps {steps} must be >= 1 and --warmup {warmup} >= 0")
    world_env = int(os.environ.get("WORLD_SIZE", "1"))
    with tempfile.TemporaryDirectory(prefix="udm-bench-") as tmp:
        # run.name first: an override setting ``name`` replaces its whole mapping (component merge rule)
        cfg = load_recipe(recipe, ["run.name=bench", *overrides, f"run.output_root={tmp}", "checkpoint.resume=never",
                                   f"train.max_steps={warmup + steps}"], world_size=world_env)
        params, flops = model_size(cfg)
        run = build_trainer(cfg)
        try:
            trainer = run.trainer
            step_fn, timer = trainer.step_fn, trainer.timer
            world = step_fn.world
            device = step_fn.device
            bare = _make_bare(cfg, step_fn, world) if compare_bare else None
            for step in range(warmup):
                step_fn(trainer.batches, step)
                if bare is not None:
                    bare(trainer.batches, step)
            _sync(device)
            timer.split()  # drop the warm-up's sections
            tokens, skipped, bare_tokens = 0, 0, 0
            full_times, bare_times = [], []
            for step in range(warmup, warmup + steps):
                t0 = time.perf_counter()
                result = step_fn(trainer.batches, step)
                _sync(device)
                full_times.append(time.perf_counter() - t0)
                tokens += result.num_tokens
                skipped += int(result.skipped)
                if bare is not None:
                    t0 = time.perf_counter()
                    bare_tokens += bare(trainer.batches, step)
                    _sync(device)
                    bare_times.append(time.perf_counter() - t0)
            seconds = sum(full_times)
            split = timer.split()
        finally:
            run.close()
    dtype = torch.bfloat16 if cfg.engine.precision == "bf16" else torch.float32
    peaks = {"bf16": measure_peak_flops(device, torch.bfloat16), "fp32": measure_peak_flops(device, torch.float32)}
    peak = measure_peak_flops(device, dtype)
    tokens_per_s = tokens / seconds
    return {
        "bench": "train", "recipe": recipe, "overrides": overrides, "run_name": cfg.run.name,
        "model": cfg.model.name, "process": cfg.process.name if cfg.process is not None else None,
        "loss": cfg.loss.name, "parameters": params, "precision": cfg.engine.precision,
        "zero_stage": cfg.engine.zero_stage, "world_size": world, "device": device_name(device),
        "micro_batch_size": cfg.engine.micro_batch_size, "global_batch_size": cfg.engine.global_batch_size,
        "seq_len": cfg.data.seq_len, "warmup_steps": warmup, "steps": steps, "skipped_steps": skipped,
        "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens_per_s,
        "tokens_per_s_per_device": tokens_per_s / world, "step_time_s": seconds / steps,
        "time_split_s": {k.split("/", 1)[1]: v / steps for k, v in split.items() if k != "time/step"},
        "flops_per_token": flops, "peak_flops": peak, "peak_flops_bf16": peaks["bf16"],
        "peak_flops_fp32": peaks["fp32"], "mfu": mfu(flops, tokens_per_s / world, peak),
        "torch_version": torch.__version__, "deepspeed_version": version("deepspeed"),
        "step_times_s": full_times, **(_bare_report(bare_times, bare_tokens, full_times) if compare_bare else {}),
    }


def _make_bare(cfg: Any, step_fn: Any, world: int) -> Any:
    """The bare step (tools/bench_bare.py) for ``cfg`` on the full step's device (single process only)."""
    if world != 1:
        raise ValueError(f"--compare-bare runs in a single process, got world size {world}")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_bare import BareStep

    from udmtrain.data.manifest import check_manifest
    from udmtrain.train.build import resolve_vocab_size

    vocab = resolve_vocab_size(cfg, check_manifest(cfg.data, expected_tokenizer=cfg.tokenizer))
    return BareStep(cfg, vocab, step_fn.device)


def _bare_report(bare_times: list[float], bare_tokens: int, full_times: list[float]) -> dict[str, Any]:
    """``bare`` (tokens/s, step time, raw step times) and ``full_over_bare`` (ratio of median step times)."""
    import statistics

    bare_s, full_s = statistics.median(bare_times), statistics.median(full_times)
    return {"bare": {"tokens_per_s": bare_tokens / sum(bare_times), "step_time_s": bare_s, "step_times_s": bare_times},
            "full_step_time_median_s": full_s, "full_over_bare": full_s / bare_s}


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # the deepspeed launcher inserts --local_rank=N before our arguments; LOCAL_RANK carries it too
    argv = [a for a in argv if not a.startswith(("--local_rank=", "--local-rank="))]
    if argv and argv[0] == "memory":
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import bench_memory

        return bench_memory.main(argv[1:])
    if argv and argv[0] == "sample":
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import bench_sample

        try:
            return bench_sample.main(argv[1:])
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    if argv and argv[0] == "data":
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        try:
            import bench_data
        except ImportError as err:
            print(f"error: 'bench.py data' needs tools/bench_data.py (run_data_bench), which cannot be imported: "
                  f"{err}", file=sys.stderr)
            return 2
        if not hasattr(bench_data, "run_data_bench"):
            print("error: tools/bench_data.py has no run_data_bench(args); update it", file=sys.stderr)
            return 2
        return bench_data.main(argv[1:])
    args = build_parser().parse_args(argv)
    from udmtrain.config import ConfigError, report_and_exit
    from udmtrain.data.errors import DataError
    from udmtrain.utils.io import check_writable

    try:
        if args.out:
            check_writable(args.out, "--out")
        report = run_train_bench(args.recipe, args.overrides, args.steps, args.warmup, args.compare_bare)
    except ConfigError as err:
        report_and_exit(err)
    except (DataError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        emit(report, args.out)
    return 0


def emit(report: dict[str, Any], out: str | None) -> None:
    """Print ``report`` as indented JSON and, with ``out``, write the same text there atomically."""
    from udmtrain.utils.io import write_text_atomic

    text = json.dumps(report, indent=1)
    print(text)
    if out:
        write_text_atomic(out, text + "\n")


if __name__ == "__main__":
    sys.exit(main())
