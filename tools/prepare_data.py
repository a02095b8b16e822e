"""Turn text into webdataset shards + manifest.json (docs/data.md).

    python tools/prepare_data.py --source demo --tokenizer gpt2 --seq-len 128 --out data/demo
    python tools/prepare_data.py --source files --input corpus/ 'more/*.jsonl.gz' \\
        --tokenizer tok/demo.model --seq-len 1024 --out data/mine
    python tools/prepare_data.py --source hf --hf-name openwebtext --tokenizer gpt2 --seq-len 1024 \\
        --num-workers 16 --out /data/owt
    python tools/prepare_data.py --source sudoku --num-puzzles 100000 --min-clues 30 --max-clues 40 \\
        --seed 0 --out data/sudoku
    python tools/prepare_data.py --source csv --input sudoku.csv --out data/sudoku_csv
    python tools/prepare_data.py --verify --out data/demo

Sudoku (docs/sudoku.md): one sample per puzzle, 164 tokens = 81 puzzle digits (0 = blank), a
separator, 81 solution digits, an end token, with a prompt mask on the puzzle and separator
(never noised, never scored). --tokenizer and --seq-len are fixed (sudoku, 164) for these sources;
the first puzzles (--valid-fraction of them) are the validation split, distinct from the training ones.

Re-running finishes an interrupted run and skips finished shards (a finished split left out of
--splits stays in the manifest). Prints the manifest summary as JSON.

--verify builds nothing: it reads every shard of --out and checks its sha256 against manifest.json
(training checks only the sizes), printing the shards checked as JSON or the first mismatching file.
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
    p.add_argument("--source", choices=["demo", "files", "hf", "sudoku", "csv"], help="required unless --verify")
    p.add_argument("--input", nargs="+", default=[],
                   help="files, directories or globs (--source files); one quizzes,solutions CSV (--source csv)")
    p.add_argument("--hf-name", help="openwebtext | wikitext-103 | lm1b | any hub dataset path")
    p.add_argument("--hf-config", help="hub dataset config (names outside the built-in table)")
    p.add_argument("--text-field", default="text", help="JSONL/parquet/hub field holding the text")
    p.add_argument("--txt-unit", default="file", choices=["file", "paragraph"],
                   help="one document per .txt file, or per blank-line-separated paragraph")
    p.add_argument("--tokenizer",
                   help="TOKENIZER.model (sentencepiece) | gpt2 | GPT2_DIR | hf:NAME_OR_DIR (any Hugging Face "
                        "tokenizer.json, e.g. hf:bert-base-uncased or hf:path/to/dir) | ids:V (text files of "
                        "decimal token ids below V, e.g. for an imported checkpoint); required except for sudoku/csv")
    p.add_argument("--seq-len", type=positive_int, help="sequence length (required except for sudoku/csv)")
    p.add_argument("--num-puzzles", type=positive_int,
                   help="sudoku: puzzles to generate (train + valid); csv: read at most this many rows")
    p.add_argument("--min-clues", type=int, default=30, help="sudoku: fewest clues of a puzzle (>= 17)")
    p.add_argument("--max-clues", type=int, default=40, help="sudoku: most clues of a puzzle (<= 81)")
    p.add_argument("--seed", type=int, default=0, help="sudoku: generator seed (puzzle i depends on (seed, i))")
    p.add_argument("--packing", default="wrap", choices=["wrap", "pad"])
    p.add_argument("--samples-per-shard", type=positive_int, default=1024)
    p.add_argument("--valid-fraction", type=unit_interval_open, default=0.02,
                   help="held-out share of documents when the source has no validation split")
    p.add_argument("--splits", nargs="+", default=["train", "valid"], choices=["train", "valid"])
    p.add_argument("--num-workers", type=nonnegative_int, default=max(0, min(8, (os.cpu_count() or 1) - 1)),
                   help="tokenizer worker processes (0: tokenize in this process)")
    p.add_argument("--overwrite", action="store_true", help="delete existing shards in --out first")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--verify", action="store_true",
                   help="build nothing: check every shard in --out against the sha256 its manifest.json records")
    p.add_argument("--out", required=True)
    return p


def _sudoku(args: argparse.Namespace, command: str) -> dict:
    """Generate or read the puzzles, split them and write the prompt-conditioned shards."""
    from udmtrain.data import sudoku, sudoku_sets
    from udmtrain.data.prepare import prepare_prompted

    if not 0.0 < args.valid_fraction < 1.0:
        raise DataError(f"--valid-fraction must be in (0, 1), got {args.valid_fraction}")
    if args.source == "sudoku":
        if not args.num_puzzles or args.num_puzzles < 2:
            raise DataError("--source sudoku needs --num-puzzles N (N >= 2)")
        sudoku.make_puzzle(args.seed, 0, args.min_clues, args.max_clues)  # checks the clue bounds early
        puzzles = sudoku_sets.generate(args.seed, 0, args.num_puzzles, args.min_clues, args.max_clues,
                                  args.num_workers, progress=not args.no_progress)
        source = {"kind": "sudoku", "seed": args.seed, "num_puzzles": args.num_puzzles,
                  "min_clues": args.min_clues, "max_clues": args.max_clues,
                  "generator": "randomized MRV backtracking + unique-solution clue removal"}
        total = args.num_puzzles
    else:
        if len(args.input) != 1:
            raise DataError("--source csv needs exactly one --input FILE.csv (columns quizzes,solutions)")
        from udmtrain.data.tokenizers import sha256_of_files

        path = os.path.abspath(args.input[0])
        puzzles_list = list(sudoku.read_csv(path, args.num_puzzles))
        puzzles, total = iter(puzzles_list), len(puzzles_list)
        source = {"kind": "csv", "input": path, "sha256": sha256_of_files([path]), "limit": args.num_puzzles}
    num_valid = max(1, round(total * args.valid_fraction))
    train, valid, dropped = sudoku_sets.split_puzzles(puzzles, num_valid)
    source["valid_fraction"] = args.valid_fraction
    source["dropped_duplicates_of_valid"] = dropped
    splits = {"train": (sudoku.encode_pair(p) for p in train), "valid": (sudoku.encode_pair(p) for p in valid)}
    splits = {k: v for k, v in splits.items() if k in args.splits}
    return prepare_prompted(splits, "sudoku", sudoku.SEQ_LEN, args.out, source,
                            samples_per_shard=args.samples_per_shard, overwrite=args.overwrite, command=command,
                            progress=not args.no_progress)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verify:
        return _verify(args.out)
    if not args.source:
        parser.error("the following arguments are required: --source (or --verify)")
    command = "python tools/prepare_data.py " + shlex.join(
        a for a in (argv if argv is not None else sys.argv[1:]) if a not in ("--overwrite",))
    if args.source in ("sudoku", "csv"):
        try:
            check_writable(args.out, "--out", directory=True)
            manifest = _sudoku(args, command)
        except (DataError, OutputError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        return _summary(args, manifest)
    if not args.tokenizer or not args.seq_len:
        print(f"error: --source {args.source} needs --tokenizer and --seq-len", file=sys.stderr)
        return 2
    from udmtrain.data.prepare import prepare
    from udmtrain.data.sources import SourceSpec

    spec = SourceSpec(kind=args.source, inputs=args.input, hf_name=args.hf_name, hf_config=args.hf_config,
                      text_field=args.text_field, txt_unit=args.txt_unit, valid_fraction=args.valid_fraction)
    if args.source == "files" and not args.input:
        print("error: --source files needs --input PATH_OR_GLOB ...", file=sys.stderr)
        return 2
    try:
        check_writable(args.out, "--out", directory=True)
        manifest = prepare(spec, args.tokenizer, args.seq_len, args.out, packing=args.packing,
                           samples_per_shard=args.samples_per_shard, num_workers=args.num_workers,
                           splits=tuple(args.splits), overwrite=args.overwrite,
                           progress=not args.no_progress, command=command)
    except (DataError, OutputError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return _summary(args, manifest)


def _verify(out: str) -> int:
    """``--verify``: the sha256 of every shard in ``out`` against its manifest; exit 2 at the first mismatch."""
    from udmtrain.data.manifest import verify_shard_hashes

    try:
        report = verify_shard_hashes(out)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({"out": out, "verified": report["splits"], "bytes": report["bytes"]}, indent=1))
    return 0


def _summary(args: argparse.Namespace, manifest: dict) -> int:
    summary = {split: {k: v for k, v in rec.items() if k != "shards"} for split, rec in manifest["splits"].items()}
    print(json.dumps({"out": args.out, "vocab_size": manifest["vocab_size"], "seq_len": manifest["seq_len"],
                      "packing": manifest["packing"], "tokens_per_second": manifest.get("tokens_per_second"),
                      "samples_per_second": manifest.get("samples_per_second"),
                      "splits": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
