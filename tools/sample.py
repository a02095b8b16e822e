"""Draw samples from a trained diffusion checkpoint, print them and write them as JSONL.

    python tools/sample.py --ckpt runs/quickstart-audm --num-samples 8 --steps 64
    python tools/sample.py --ckpt runs/quickstart-audm/checkpoints/step_0000000300 --num-samples 4 \\
        --steps 128 --sampler confidence --temperature 0.9 --top-p 0.95 --seed 3 --out samples.jsonl
    python tools/sample.py --ckpt runs/udlm --num-samples 4 --steps 64 --temperature-on loo \\
        --prefix "Once upon a time" --no-ema sampler.record_trajectory=false

Any registered sampler (``--sampler NAME``); its settings come from the flags or from dotted
``sampler.*`` overrides, validated by the recipe system (a bad key prints the recipe report, exit 2).
Each JSONL line: ``{"index", "text", "token_ids", "nfe", "seed", "checkpoint", "step", "ema", "sampler"}``
where ``seed`` is the seed of the sample's batch (batch i: ``udmtrain.utils.seed.batch_seed(--seed, i)``, a
hash, so runs with different ``--seed`` share no batch).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from udmtrain.train import inference as inf  # noqa: E402
from udmtrain.utils.argtypes import device_name, positive_int  # noqa: E402
from udmtrain.utils.io import atomic_open, check_writable  # noqa: E402
from udmtrain.eval.frontier import context_id  # noqa: E402
from udmtrain.train.exports import is_export  # noqa: E402
from udmtrain.utils.progress import counting  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="run dir, its checkpoints/ dir, a step_XXXXXXXXXX dir, or an export "
                                                 "of tools/export_ckpt.py")
    p.add_argument("--num-samples", type=positive_int, default=8)
    inf.add_sampler_arguments(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=positive_int, default=None, help="samples per sampler call (default: all)")
    p.add_argument("--prefix", default=None, help="text every sample starts with (BOS prepended; refused when "
                                                   "longer than the sequence)")
    p.add_argument("--out", default=None, help="JSONL output (default: <run dir>/samples/<step dir>-<sampler>-<hash of "
                                               "the settings>-seed<K>.jsonl; for an export DIR: <DIR's parent>/"
                                               "samples/<DIR name>-<sampler>-<hash>-seed<K>.jsonl)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--device", type=device_name, default=None, help="cpu | cuda[:i] (default: cuda when available)")
    p.add_argument("--quiet", action="store_true", help="do not print the samples")
    return p


def default_device(device: str | None) -> str:
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def main(argv: list[str] | None = None) -> int:
    args, unknown = build_parser().parse_known_args(argv)
    overrides = inf.sampler_overrides(args, inf.split_overrides(unknown))
    if args.out:
        check_writable(args.out, "--out")
    inf.require_diffusion_run(args.ckpt, "tools/sample.py")
    loaded = inf.load_for_inference(args.ckpt, overrides, use_ema=not args.no_ema,
                                    device=default_device(args.device))
    batch_size = args.batch_size or args.num_samples
    with inf.sampling_progress(loaded, args.num_samples, batch_size) as bar:
        drawn = inf.draw_samples(loaded, args.num_samples, batch_size, args.seed, prefix_text=args.prefix,
                                 network=counting(loaded.network(), bar.update))
    settings = inf.sampler_settings(loaded)
    # Never inside the checkpoint directory: checkpoints are immutable and keep_last prunes them.
    step_dir = os.path.normpath(str(loaded.step_dir))
    # an export (tools/export_ckpt.py) keeps its directory clean too: exports/samples/<name>-seed<K>.jsonl
    run_dir = os.path.dirname(step_dir) if is_export(step_dir) else os.path.dirname(os.path.dirname(step_dir))
    # the name says what was drawn, so runs with other sampler settings never overwrite each other's samples
    tag = context_id({"sampler": settings, "ema": loaded.use_ema, "num_samples": args.num_samples,
                      "batch_size": batch_size, "prefix": args.prefix, "device": str(loaded.device)})[:8]
    out = args.out or os.path.join(run_dir, "samples",
                                   f"{os.path.basename(step_dir)}-{settings.get('name', 'sampler')}-{tag}"
                                   f"-seed{args.seed}.jsonl")
    check_writable(out, "--out")
    protocol = loaded.protocol()
    with atomic_open(out) as f:
        index = 0
        for batch, (nfe, seed, size) in enumerate(zip(drawn["nfe"], drawn["seeds"], drawn["batch_sizes"])):
            for _ in range(size):
                ids = drawn["tokens"][index].tolist()
                text = loaded.tokenizer.decode(ids)
                f.write(json.dumps({"index": index, "text": text, "token_ids": ids, "nfe": nfe, "seed": seed,
                                    "batch": batch, "prefix": args.prefix, **protocol,
                                    "sampler": settings}) + "\n")
                if not args.quiet:
                    print(f"--- sample {index} (seed {seed}, nfe {nfe}) ---\n{text}")
                index += 1
    print(f"udmtrain: wrote {index} samples ({settings.get('name')}, {settings.get('num_steps')} steps) to {out}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(inf.run_cli(main, sys.argv[1:]))
