"""Fault-injection fixtures: a tiny real data set and one real 2-step run, built once per session.

Every case injects one fault into a *copy* of them and asserts the contract of docs/security.md:
exit status 2, a one-line message naming the culprit (file, shard, key or flag), no traceback, and
nothing partial left behind. Tools run in-process through their ``main(argv)`` where the exit code
is the only point; a few cases run as subprocesses, where the real output is the point.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VOCAB_SIZE = 400
SEQ_LEN = 32
TINY = ["model.hidden_size=32", "model.num_blocks=1", "model.num_heads=2", "model.cond_dim=16",
        f"data.seq_len={SEQ_LEN}", "data.num_workers=0", "engine.micro_batch_size=2", "engine.global_batch_size=4",
        "engine.precision=fp32", "lr_schedule.warmup_steps=1", "train.log_every=1", "eval.every=0"]


def tool(name: str):
    """The module ``tools/<name>.py`` (imported once; its ``main(argv)`` is what the CLI runs)."""
    key = f"udmtrain_tool_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, REPO / "tools" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


def env() -> dict[str, str]:
    out = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "UDMTRAIN_DEBUG"):
        out.pop(key, None)
    return out


def run(args: list[str], timeout: int = 300, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, env={**env(), **(extra_env or {})},
                          capture_output=True, text=True, timeout=timeout)


def data_overrides(data: Path) -> list[str]:
    return [f"data.train_shards={data}", f"data.valid_shards={data}",
            f"tokenizer={{name: sentencepiece, path: {data}/tokenizer.model}}"]


def assert_refused(code: int, output: str, *culprits: str) -> str:
    """Exit 2, no traceback, and one line of ``output`` naming every culprit; returns that line."""
    assert code == 2, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    lines = [line for line in output.splitlines() if all(c in line for c in culprits)]
    assert lines, f"no single line names {culprits}:\n{output[-3000:]}"
    return lines[0]


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
