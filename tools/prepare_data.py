"""Turn text into webdataset shards + manifest.json (docs/data.md).

    python tools/prepare_data.py --source demo --tokenizer gpt2 --seq-len 128 --out data/demo
    python tools/prepare_data.py --source files --input corpus/ 'more/*.jsonl.gz' \\
        --tokenizer tok/demo.model --seq-len 1024 --out data/mine
    python tools/prepare_data.py --source hf --hf-name openwebtext --tokenizer gpt2 --seq-len 1024 \\
        --num-workers 16 --out /data/owt

Re-running finishes an interrupted run and skips finished shards. Prints the manifest summary as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from udmtrain.data.errors import DataError  # noqa: E402
from udmtrain.utils.argtypes import nonnegative_int, positive_int, unit_interval_open  # noqa: E402
from udmtrain.utils.io import OutputError, check_writable  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", required=True, choices=["demo", "files", "hf"])
    p.add_argument("--input", nargs="+", default=[], help="files, directories or globs (--source files)")
    p.add_argument("--hf-name", help="openwebtext | wikitext-103 | lm1b | any hub dataset path")
    p.add_argument("--hf-config", help="hub dataset config (names outside the built-in table)")
    p.add_argument("--text-field", default="text", help="JSONL/parquet/hub field holding the text")
    p.add_argument("--txt-unit", default="file", choices=["file", "paragraph"],
                   help="one document per .txt file, or per blank-line-separated paragraph")
    p.add_argument("--tokenizer", required=True,
                   help="TOKENIZER.model (sentencepiece) | gpt2 | GPT2_DIR | hf:NAME_OR_DIR (any Hugging Face "
                        "tokenizer.json, e.g. hf:bert-base-uncased or hf:path/to/dir)")
    p.add_argument("--seq-len", type=positive_int, required=True)
    p.add_argument("--packing", default="wrap", choices=["wrap", "pad"])
    p.add_argument("--samples-per-shard", type=positive_int, default=1024)
    p.add_argument("--valid-fraction", type=unit_interval_open, default=0.02,
                   help="held-out share of documents when the source has no validation split")
    p.add_argument("--splits", nargs="+", default=["train", "valid"], choices=["train", "valid"])
    p.add_argument("--num-workers", type=nonnegative_int, default=max(0, min(8, (os.cpu_count() or 1) - 1)),
                   help="tokenizer worker processes (0: tokenize in this process)")
    p.add_argument("--overwrite", action="store_true", help="delete existing shards in --out first")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", required=True)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from udmtrain.data.prepare import prepare
    from udmtrain.data.sources import SourceSpec

    spec = SourceSpec(kind=args.source, inputs=args.input, hf_name=args.hf_name, hf_config=args.hf_config,
                      text_field=args.text_field, txt_unit=args.txt_unit, valid_fraction=args.valid_fraction)
    if args.source == "files" and not args.input:
        print("error: --source files needs --input PATH_OR_GLOB ...", file=sys.stderr)
        return 2
    command = "python tools/prepare_data.py " + shlex.join(
        a for a in (argv if argv is not None else sys.argv[1:]) if a not in ("--overwrite",))
    try:
        check_writable(args.out, "--out", directory=True)
        manifest = prepare(spec, args.tokenizer, args.seq_len, args.out, packing=args.packing,
                           samples_per_shard=args.samples_per_shard, num_workers=args.num_workers,
                           splits=tuple(args.splits), overwrite=args.overwrite,
                           progress=not args.no_progress, command=command)
    except (DataError, OutputError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    summary = {split: {k: v for k, v in rec.items() if k != "shards"} for split, rec in manifest["splits"].items()}
    print(json.dumps({"out": args.out, "vocab_size": manifest["vocab_size"], "seq_len": manifest["seq_len"],
                      "packing": manifest["packing"], "tokens_per_second": manifest["tokens_per_second"],
                      "splits": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
