"""Fault-injection fixtures: a tiny real data set and one real 2-step run, built once per session.

Every case injects one fault into a *copy* of them and asserts the contract of docs/security.md:
exit status 2, a one-line message naming the culprit (file, shard, key or flag), no traceback, and
nothing partial left behind. Tools run in-process through their ``main(argv)`` where the exit code
is the only point; a few cases run as subprocesses, where the real output is the point.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from fault_helpers import REPO, SEQ_LEN, TINY, VOCAB_SIZE, assert_refused, data_overrides, env, run, tool  # noqa: F401


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A V=400 sentencepiece model and seq_len-32 shards of the demo corpus (real tools, in-process)."""
    out = tmp_path_factory.mktemp("fault_data") / "demo"
    out.mkdir()
    assert tool("train_tokenizer").main(["--source", "demo", "--vocab-size", str(VOCAB_SIZE),
                                         "--out", str(out / "tokenizer.model")]) == 0
    assert tool("prepare_data").main(["--source", "demo", "--tokenizer", str(out / "tokenizer.model"),
                                      "--seq-len", str(SEQ_LEN), "--samples-per-shard", "512", "--num-workers", "0",
                                      "--no-progress", "--out", str(out)]) == 0
    return out


@pytest.fixture
def data_copy(tiny_data: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny data set, free to damage."""
    return Path(shutil.copytree(tiny_data, tmp_path / "data"))


@pytest.fixture(scope="session")
def trained_run(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real 2-step AUDM quickstart run (EMA on, ZeRO-1) with its final checkpoint."""
    root = tmp_path_factory.mktemp("fault_runs")
    proc = run(["launch/pretrain.py", "--recipe", "recipes/quickstart.yaml", "run.name=base",
                f"run.output_root={root}", *TINY, *data_overrides(tiny_data), "train.max_steps=2",
                "engine.zero_stage=1", "checkpoint.every=1000"])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return root / "base"


@pytest.fixture
def run_copy(trained_run: Path, tmp_path: Path) -> Path:
    """A private copy of the trained run (its recipe's data paths still point at ``tiny_data``)."""
    return Path(shutil.copytree(trained_run, tmp_path / "runs" / "base"))
