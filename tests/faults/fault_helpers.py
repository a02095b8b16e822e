"""Fault-injection helpers shared by the cases and the fixtures of conftest.py (a uniquely named module,
so ``from fault_helpers import ...`` resolves to this file whatever other conftest.py pytest loaded last)."""


from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path


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


def call(name: str, argv: list[str], capsys) -> tuple[int, str]:
    """Run ``tools/<name>.py``'s ``main(argv)`` in-process as its CLI does -> ``(exit code, stdout + stderr)``."""
    from udmtrain.train import inference as inf

    try:
        code = inf.run_cli(tool(name).main, argv)
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out + captured.err
