"""Data loader throughput: samples/s and tokens/s of the streaming train loader, as JSON.

    python tools/bench_data.py --shards data/demo --batch-size 32 --num-workers 2 --num-batches 200
    python tools/bench.py data --shards data/demo ...        (the same, through the bench front end)

``tokens_per_s`` counts non-padding positions (``valid``); ``positions_per_s`` counts all of them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Add the data-bench options to ``parser`` (or a new one); ``tools/bench.py data`` reuses it."""
    p = parser or argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True, help="prepare_data output directory, or a shard pattern")
    p.add_argument("--manifest", default=None, help="manifest.json (needed only for remote shards)")
    from udmtrain.utils.argtypes import nonnegative_int, positive_int

    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--num-workers", type=nonnegative_int, default=2)
    p.add_argument("--shuffle-buffer", type=nonnegative_int, default=1000)
    p.add_argument("--num-batches", type=positive_int, default=100)
    p.add_argument("--warmup-batches", type=nonnegative_int, default=5)
    p.add_argument("--seed", type=int, default=0)
    return p


@dataclass
class _BenchData:
    train_shards: str
    valid_shards: str
    seq_len: int
    shuffle_buffer: int
    num_workers: int
    on_corrupt: str = "fail"
    manifest: str | None = None


def run_data_bench(args: argparse.Namespace) -> dict[str, Any]:
    """Time ``num_batches`` batches of the train loader after ``warmup_batches``; returns the report."""
    from udmtrain.data.loader import build_train_loader
    from udmtrain.data.manifest import load_manifest, manifest_path_for

    manifest = load_manifest(manifest_path_for(args.shards, args.manifest))
    cfg = _BenchData(args.shards, args.shards, manifest.seq_len, args.shuffle_buffer, args.num_workers,
                     manifest=args.manifest)
    loader = build_train_loader(cfg, args.batch_size, 0, 1, args.seed)
    try:
        t_start = time.perf_counter()
        for _ in range(args.warmup_batches):
            next(loader)
        t_first = time.perf_counter()
        tokens = 0
        for _ in range(args.num_batches):
            tokens += int(next(loader)["valid"].sum())
        seconds = time.perf_counter() - t_first
    finally:
        loader.close()
    samples = args.num_batches * args.batch_size
    return {"bench": "data", "shards": args.shards, "seq_len": manifest.seq_len, "batch_size": args.batch_size,
            "num_workers": args.num_workers, "shuffle_buffer": args.shuffle_buffer, "num_batches": args.num_batches,
            "warmup_s": round(t_first - t_start, 3), "seconds": round(seconds, 3),
            "samples_per_s": round(samples / seconds, 1),
            "tokens_per_s": round(tokens / seconds, 1),
            "positions_per_s": round(samples * manifest.seq_len / seconds, 1)}


def main(argv: list[str] | None = None) -> int:
    from udmtrain.data.errors import DataError

    args = build_parser().parse_args(argv)
    try:
        print(json.dumps(run_data_bench(args), indent=1))
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
