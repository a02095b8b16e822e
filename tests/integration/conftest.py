"""Integration fixtures: the tiny demo corpus (a sentencepiece model of V=400 and seq_len-32 shards)
built once per session by the real ``tools/train_tokenizer.py`` and ``tools/prepare_data.py``, and
training runs shared by several tests (each run is a real ``launch/pretrain.py`` subprocess)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_helpers as th  # noqa: E402


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory with ``tokenizer.model``, ``train-*.tar``, ``valid-*.tar`` and ``manifest.json``."""
    out = tmp_path_factory.mktemp("tiny_data")
    tok = out / "tokenizer.model"
    for cmd in ([sys.executable, "tools/train_tokenizer.py", "--source", "demo", "--vocab-size", str(th.VOCAB_SIZE),
                 "--out", str(tok)],
                [sys.executable, "tools/prepare_data.py", "--source", "demo", "--tokenizer", str(tok), "--seq-len",
                 str(th.SEQ_LEN), "--no-progress", "--out", str(out)]):
        proc = subprocess.run(cmd, cwd=th.REPO, capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, th.describe(proc)
    assert (out / "manifest.json").is_file() and list(out.glob("train-*.tar"))
    return out


@pytest.fixture(scope="session")
def runs_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="session")
def straight_1rank(tiny_data: Path, runs_root: Path) -> Path:
    """4 fp32 ZeRO-1 steps of the quickstart (1 process, one loader worker, EMA on), a checkpoint
    every step with ``keep_last=2``; returns the run directory."""
    proc = th.run("recipes/quickstart.yaml", th.tiny_overrides(
        tiny_data, runs_root, "straight1", *RESUME_1RANK, "train.max_steps=4", "checkpoint.every=1"))
    run_dir = runs_root / "straight1"
    th.check_ok(proc, run_dir, 4)
    return run_dir


RESUME_1RANK = ("engine.zero_stage=1", "engine.precision=fp32", "data.num_workers=1", "checkpoint.keep_last=2")
"""Settings of the 1-process resume test (shared by its straight and split runs)."""
