"""prepare_data --source sudoku|csv: prompt-conditioned shards, manifest, distinct validation puzzles,
the loaders' ``prompt`` masks, and the fixed sudoku tokenizer."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from udmtrain.data import build_train_loader, build_valid_loader, check_manifest
from udmtrain.data import sudoku as S
from udmtrain.data.tokenizers import load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import prepare_data  # noqa: E402


class Cfg:
    """Stand-in for the recipe's data section."""

    def __init__(self, out):
        self.train_shards, self.valid_shards = f"{out}/train-*.tar", f"{out}/valid-*.tar"
        self.seq_len, self.shuffle_buffer, self.num_workers, self.on_corrupt, self.shuffle = 164, 4, 0, "fail", True
        self.manifest, self.tokenizer = None, "sudoku"


def _prepare(*extra):
    return prepare_data.main(["--no-progress", "--num-workers", "0", "--samples-per-shard", "16", *extra])


def test_generated_shards_manifest_and_prompt_batches(tmp_path):
    out = str(tmp_path / "sd")
    args = ["--source", "sudoku", "--num-puzzles", "60", "--min-clues", "50", "--max-clues", "60",
            "--seed", "3", "--valid-fraction", "0.1", "--out", out]
    assert _prepare(*args) == 0
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert manifest["prompt"] is True and manifest["seq_len"] == 164 and manifest["vocab_size"] == 13
    assert manifest["tokenizer"]["name"] == "sudoku"
    assert manifest["splits"]["valid"]["num_samples"] == 6 and manifest["splits"]["train"]["num_samples"] == 54
    assert manifest["splits"]["train"]["num_prompt_tokens"] == 54 * 82
    check_manifest(Cfg(out), expected_vocab_size=13)
    valid = build_valid_loader(Cfg(out), 4, 0, 1)
    batches = list(valid)
    assert len(batches) == 2 and batches[1]["valid"][2:].sum() == 0  # 6 puzzles: the tail is padding
    first = batches[0]
    assert first["prompt"].dtype == torch.bool and first["prompt"].shape == (4, 164)
    assert bool(first["prompt"][:, :82].all()) and not bool(first["prompt"][:, 82:].any())
    assert not bool(batches[1]["prompt"][2:].any())  # padding rows carry no prompt
    # the stored puzzles are exactly puzzles 0..59 of seed 3, the first 6 being the validation split
    expected = [S.make_puzzle(3, i, 50, 60) for i in range(60)]
    got_valid = [S.encode_pair(p)[0].tolist() for p in expected[:6]]
    assert [row.tolist() for b in batches for row, ok in zip(b["input_ids"], b["valid"][:, 0]) if ok] == got_valid
    train = build_train_loader(Cfg(out), 8, 0, 1, seed=0)
    batch = next(train)
    assert bool(batch["prompt"][:, :82].all()) and not bool(batch["prompt"][:, 82:].any())
    train.close()
    train_quizzes = {S.decode_solution(r.numpy()) for b in [batch] for r in b["input_ids"]}
    assert not train_quizzes & {p.solution for p in expected[:6]}
    # re-running with the same settings is a no-op; other settings are refused
    assert _prepare(*args) == 0
    assert _prepare(*[a if a != "60" else "61" for a in args]) == 2


def test_csv_source_and_distinct_splits(tmp_path, capsys):
    puzzles = [S.make_puzzle(4, i, 40, 60) for i in range(10)]
    csv_path = str(tmp_path / "p.csv")
    S.write_csv(csv_path, puzzles + puzzles[:2])  # two repeats of validation puzzles are dropped from train
    out = str(tmp_path / "csv")
    assert _prepare("--source", "csv", "--input", csv_path, "--valid-fraction", "0.2", "--out", out) == 0
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert manifest["source"]["dropped_duplicates_of_valid"] == 2
    assert manifest["splits"]["valid"]["num_samples"] == 2 and manifest["splits"]["train"]["num_samples"] == 8
    bad = tmp_path / "bad.csv"
    bad.write_text("quizzes,solutions\n" + "1" * 81 + "," + puzzles[0].solution + "\n")
    capsys.readouterr()
    assert _prepare("--source", "csv", "--input", str(bad), "--out", str(tmp_path / "bad")) == 2
    assert f"{bad}:2" in capsys.readouterr().err


def test_sudoku_tokenizer_round_trip():
    tok = load_tokenizer("sudoku")
    p = S.make_puzzle(0, 0, 50, 60)
    ids, _ = S.encode_pair(p)
    assert tok.encode(p.quiz + "|" + p.solution) == ids[:-1].tolist()
    assert tok.decode(ids) == p.quiz + "|" + p.solution  # END dropped
    assert tok.vocab_size == 13 and tok.pad_id == 10 and tok.eos_id == 12
    with pytest.raises(Exception, match="not a digit"):
        tok.encode("12a")
