"""Validation NELBO bound (diffusion) or exact NLL (AR) of a checkpoint, with every protocol choice in JSON.

    python tools/eval_ppl.py --ckpt runs/quickstart-audm
    python tools/eval_ppl.py --ckpt runs/quickstart-audm --num-t-samples 8 --method quadrature \\
        --data data/demo data/other/valid-*.tar --batch-size 32 --max-batches 50 --seed 1 --out ppl.json
    python tools/eval_ppl.py --ckpt runs/quickstart-ar --no-ema          # exact AR NLL, raw weights
    deepspeed --num_gpus 2 tools/eval_ppl.py --ckpt runs/quickstart-audm --out ppl.json

``--data`` takes shard directories or patterns (each with a manifest.json beside it), checked for the
checkpoint's tokenizer (sha256), vocabulary size and ``seq_len``; default: the recipe's
``data.valid_shards``. Under a launcher (WORLD_SIZE > 1) every rank evaluates its share of the shards
(``build_valid_loader(rank, world)``) and the statistics are summed over ranks, so the result does not
depend on the number of ranks beyond the random t / noise draws (per-rank streams from ``--seed``).
Output: ``{"checkpoint", "step", "ema", ..., "results": [{"data", "nll", "nll_stderr", "ppl", "bpd",
"num_tokens", "num_sequences", "method", "num_t_samples", "eps", "seed", ...}, ...]}`` on stdout (rank 0)
and in ``--out``: the checkpoint fields once at the top, one result per validation set. ``nll`` is nats
per token (an upper bound for diffusion, exact for AR), ``ppl = exp(nll)``, ``bpd = nll / ln 2``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from udmtrain.train import inference as inf  # noqa: E402
from udmtrain.utils.argtypes import device_name, positive_int  # noqa: E402
from udmtrain.utils.io import check_writable, write_text_atomic  # noqa: E402
from udmtrain.utils.progress import progress  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="run dir, its checkpoints/ dir, a step_XXXXXXXXXX dir, or an export "
                                                 "of tools/export_ckpt.py")
    p.add_argument("--data", nargs="+", default=None, help="validation shard dirs/patterns (default: recipe's)")
    p.add_argument("--num-t-samples", type=positive_int, default=None, help="K time samples (default: eval.num_t_samples)")
    p.add_argument("--method", choices=["mc", "quadrature"], default="mc")
    p.add_argument("--batch-size", type=positive_int, default=None, help="per rank (default: engine.micro_batch_size)")
    p.add_argument("--max-batches", type=positive_int, default=None, help="per rank per data set (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--device", type=device_name, default=None, help="cpu | cuda[:i] (default: the rank's device)")
    p.add_argument("--out", default=None, help="JSON output file (rank 0)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def setup_ranks(device: str | None) -> tuple[int, int, str]:
    """(rank, world, device): a process group only under a launcher (WORLD_SIZE > 1)."""
    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from udmtrain.engine.deepspeed_engine import init_distributed

        rank, world, dev = init_distributed()
        return rank, world, device or str(dev)
    return 0, 1, device or ("cuda" if torch.cuda.is_available() else "cpu")


def check_data(spec: str, loaded: inf.Loaded) -> str:
    """The manifest path of validation set ``spec``; DataError if it does not fit the checkpoint."""
    from udmtrain.data.errors import DataError
    from udmtrain.data.manifest import load_manifest, manifest_path_for

    m = load_manifest(manifest_path_for(spec))
    want_sha = loaded.tokenizer.identity().get("sha256")
    got_sha = m.tokenizer.get("sha256")
    problems = []
    if m.seq_len != int(loaded.cfg.data.seq_len):
        problems.append(f"seq_len {m.seq_len} (checkpoint: {loaded.cfg.data.seq_len})")
    if m.vocab_size != loaded.vocab_size:
        problems.append(f"vocabulary size {m.vocab_size} (checkpoint: {loaded.vocab_size})")
    if want_sha and got_sha and want_sha != got_sha:
        problems.append(f"tokenizer sha256 {got_sha[:12]} (checkpoint: {want_sha[:12]})")
    if problems:
        raise DataError(f"--data {spec}: its shards ({m.path}) do not fit {loaded.step_dir}: {'; '.join(problems)}; "
                        "re-run tools/prepare_data.py with the checkpoint's tokenizer and seq_len")
    return m.path


def evaluate(loaded: inf.Loaded, spec: str, args, rank: int, world: int) -> dict:
    """NELBO / exact-NLL record of one validation set (all ranks take part)."""
    from udmtrain.data.loader import build_valid_loader
    from udmtrain.eval.ppl import estimate_nelbo, exact_ar_nll, torch_all_reduce_sum
    from udmtrain.train.build import ar_nll_fn, nelbo_fn
    from udmtrain.train.evaluate import doc_batch_kwargs

    cfg = loaded.cfg
    data_cfg = dataclasses.replace(cfg.data, valid_shards=spec)
    batch_size = args.batch_size or cfg.engine.micro_batch_size
    loader = build_valid_loader(data_cfg, batch_size, rank, world)
    total = len(loader) if args.max_batches is None else min(len(loader), args.max_batches)
    bar = progress(total, f"eval {spec}", unit="batch")  # rank 0 only
    batches = ({k: (v.to(loaded.device) if hasattr(v, "to") else v) for k, v in b.items()}
               for b in bar.wrap(itertools.islice(loader, args.max_batches)))
    reduce = torch_all_reduce_sum if world > 1 else None
    protocol = {"data": spec, "manifest": check_data(spec, loaded), "batch_size_per_rank": batch_size,
                "max_batches": args.max_batches, "world_size": world,
                "document_attention": bool(doc_batch_kwargs(cfg))}  # checkpoint fields: once, at the top
    network = loaded.network()
    with bar:
        if loaded.components.is_diffusion:
            K = args.num_t_samples or cfg.eval.num_t_samples
            eps = float(cfg.train.t_min)
            return estimate_nelbo(nelbo_fn(loaded.components, network), batches, num_t_samples=K, seed=args.seed,
                                  batch_kwargs=doc_batch_kwargs(loaded.cfg), eps=eps, method=args.method,
                                  all_reduce_sum=reduce, rank=rank, protocol=protocol)
        return exact_ar_nll(ar_nll_fn(loaded.components, network), batches, all_reduce_sum=reduce,
                            protocol=protocol, batch_kwargs=doc_batch_kwargs(loaded.cfg))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.out:
        check_writable(args.out, "--out")
    inf.resolve_checkpoint(args.ckpt)  # a bad path fails before any process group starts
    rank, world, device = setup_ranks(args.device)
    try:
        loaded = inf.load_for_inference(args.ckpt, use_ema=not args.no_ema, device=device)
        specs = args.data or ([loaded.cfg.data.valid_shards] if loaded.cfg.data.valid_shards else [])
        if not specs:
            raise inf.InferenceError(f"{loaded.step_dir}: the recipe has no data.valid_shards; pass --data DIR")
        for spec in specs:
            check_data(spec, loaded)
        results = [evaluate(loaded, spec, args, rank, world) for spec in specs]
    finally:
        if world > 1:
            from udmtrain.engine.deepspeed_engine import teardown

            teardown()
    report = {**loaded.protocol(), "world_size": world, "results": results}
    if rank == 0:
        text = json.dumps(report, indent=2)
        print(text)
        if args.out:
            write_text_atomic(args.out, text + "\n")
        for r in results:
            print(f"udmtrain: {r['data']}: nll {r['nll']:.4f} +- {r['nll_stderr']:.4f} | ppl {r['ppl']:.2f} | "
                  f"bpd {r['bpd']:.4f} | {r['num_tokens']:,} tokens", file=sys.stderr)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(inf.run_cli(main, sys.argv[1:]))
