"""Shared fixtures for the data tests: a small text corpus and the shards built from it."""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass

import pytest

WORDS = ("the river ran past old mills and quiet towns while people spoke of weather trade music "
         "letters science bread winter harbours bridges").split()


def write_corpus(directory: str, num_txt: int = 12, num_jsonl_lines: int = 30, seed: int = 0) -> list[str]:
    """Write .txt and .jsonl files; returns the documents in the order the files source reads them."""
    rng = random.Random(seed)
    os.makedirs(directory, exist_ok=True)

    def doc() -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 120))) + "."

    docs_by_file: dict[str, list[str]] = {}
    for i in range(num_txt):
        text = doc()
        path = os.path.join(directory, f"a{i:02d}.txt")
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text)
        docs_by_file[path] = [text]
    path = os.path.join(directory, "b.jsonl")
    lines = [doc() for _ in range(num_jsonl_lines)]
    with open(path, "w", encoding="utf-8") as handle:
        for text in lines:
            handle.write(json.dumps({"text": text, "id": 1}) + "\n")
    docs_by_file[path] = lines
    return [d for p in sorted(docs_by_file) for d in docs_by_file[p]]


@dataclass
class DataCfg:
    """Stand-in for the recipe's DataSection."""

    train_shards: object
    valid_shards: object
    seq_len: int = 32
    shuffle_buffer: int = 8
    num_workers: int = 0
    on_corrupt: str = "fail"
    tokenizer: str = "gpt2"


@pytest.fixture(scope="session")
def data_cfg_class():
    return DataCfg


@pytest.fixture(scope="session")
def gpt2():
    from udmtrain.data.tokenizers import load_tokenizer

    return load_tokenizer("gpt2")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("corpus"))
    return directory, write_corpus(directory)


@pytest.fixture(scope="session")
def shards(tmp_path_factory, corpus):
    """Shards of the corpus: gpt2, seq_len 32, 16 samples per shard, every 5th document held out."""
    from udmtrain.data.prepare import prepare
    from udmtrain.data.sources import SourceSpec

    out = str(tmp_path_factory.mktemp("shards"))
    spec = SourceSpec(kind="files", inputs=[corpus[0]], valid_fraction=0.2)
    manifest = prepare(spec, "gpt2", 32, out, samples_per_shard=16, progress=False, command="python tools/prepare_data.py X")
    return out, manifest
