"""Train a lossless sentencepiece tokenizer (byte fallback; BPE or unigram) on any data source.

    python tools/train_tokenizer.py --source demo --vocab-size 2048 --out data/demo/tokenizer.model
    python tools/train_tokenizer.py --source files --input corpus/ --vocab-size 32000 --model-type unigram \\
        --out tokenizers/mine.model
    python tools/train_tokenizer.py --source hf --hf-name openwebtext --max-documents 200000 ...

Ids: unk=0, bos=1, eos=2, pad=3 (docs/data.md, "Special tokens"). Training reads the train split
only (the held-out validation documents stay unseen). Prints the tokenizer identity as JSON.

An existing --out is refused unless --force: shards and runs built with a model record its sha256,
and a model retrained under the same name would decode their samples wrongly. The model is written
atomically (a failed training leaves the old one as it was).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from udmtrain.data.errors import DataError  # noqa: E402
from udmtrain.utils.argtypes import positive_int, unit_interval_open  # noqa: E402
from udmtrain.utils.io import OutputError, check_writable  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", required=True, choices=["demo", "files", "hf"])
    p.add_argument("--input", nargs="+", default=[])
    p.add_argument("--hf-name")
    p.add_argument("--hf-config")
    p.add_argument("--text-field", default="text")
    p.add_argument("--vocab-size", type=positive_int, required=True)
    p.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"])
    p.add_argument("--valid-fraction", type=unit_interval_open, default=0.02)
    p.add_argument("--max-documents", type=int, default=None, help="train on the first N documents only")
    p.add_argument("--max-sentences", type=int, default=2_000_000, help="sentencepiece input_sentence_size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="TOKENIZER.model")
    p.add_argument("--force", action="store_true", help="replace an existing --out (rebuild its shards afterwards)")
    args = p.parse_args(argv)
    try:
        check_writable(args.out, "--out")
    except OutputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if os.path.exists(args.out) and not args.force:
        print(f"error: --out {args.out} already exists, and shards or runs built with it would decode wrongly under "
              "a retrained model; choose another --out, or pass --force to replace it (then rebuild its shards)",
              file=sys.stderr)
        return 2
    from udmtrain.data.sources import SourceSpec, iter_documents
    from udmtrain.data.tokenizers import train_sentencepiece

    spec = SourceSpec(kind=args.source, inputs=args.input, hf_name=args.hf_name, hf_config=args.hf_config,
                      text_field=args.text_field, valid_fraction=args.valid_fraction)
    try:
        docs = itertools.islice(iter_documents(spec, "train"), args.max_documents)
        tok = train_sentencepiece(docs, args.out, args.vocab_size, args.model_type, args.max_sentences, args.seed)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:  # sentencepiece refuses e.g. a vocabulary too large for the text
        print(f"error: sentencepiece training failed: {err}", file=sys.stderr)
        return 2
    print(json.dumps(tok.identity(), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
