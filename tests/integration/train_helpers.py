"""Helpers of the training integration tests: launch ``launch/pretrain.py`` in a subprocess (plain
``python``, the ``deepspeed`` launcher or ``torchrun``) on the tiny demo shards, and read back what a
run wrote (metrics.jsonl, checkpoints, DeepSpeed shards, per-rank train states).

The gloo teardown SIGABRT flake (ENVIRONMENT.md: ~1 in 60 two-rank runs even with barrier +
destroy_process_group) is tolerated only *after* the run's final checkpoint was written: see
``check_ok``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]
PRETRAIN = REPO / "launch" / "pretrain.py"
VOCAB_SIZE = 400
"""Smallest demo sentencepiece vocabulary that covers the corpus's characters (300 is refused)."""
SEQ_LEN = 32

TINY_MODEL = ["model.hidden_size=32", "model.num_blocks=1", "model.num_heads=2"]
"""Architecture shrink shared by every recipe; the DiT also gets ``model.cond_dim=16``."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_overrides(data_dir: Path, run_root: Path, name: str, *extra: str, dit: bool = True) -> list[str]:
    """Overrides that shrink any shipped recipe to a seconds-long run on the tiny shards.

    ``run.name`` comes before ``run.output_root``: an override that sets ``name`` on a mapping
    replaces that mapping (the component merge rule), so the order keeps ``output_root``.
    """
    out = [f"run.name={name}", f"run.output_root={run_root}", *TINY_MODEL,
           f"data.seq_len={SEQ_LEN}", f"data.train_shards={data_dir}/train-*.tar",
           f"data.valid_shards={data_dir}/valid-*.tar", "data.num_workers=0",
           f"tokenizer={{name: sentencepiece, path: {data_dir}/tokenizer.model}}",
           "engine.micro_batch_size=2", "engine.global_batch_size=4", "engine.precision=fp32",
           "lr_schedule.warmup_steps=1", "train.log_every=1", "eval.every=0", "checkpoint.every=1000"]
    if dit:
        out.append("model.cond_dim=16")
    return out + list(extra)


def _env() -> dict[str, str]:
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1",
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions")))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def command(recipe: str | Path, overrides: list[str], launcher: str = "python", nproc: int = 1) -> list[str]:
    """The command line of one run: ``python``, ``deepspeed --num_gpus N`` or ``torchrun --nproc_per_node N``."""
    bindir = Path(sys.executable).parent
    args = [str(PRETRAIN), "--recipe", str(recipe), *overrides]
    if launcher == "python":
        assert nproc == 1
        return [sys.executable, *args]
    if launcher == "deepspeed":
        exe = bindir / "deepspeed" if (bindir / "deepspeed").exists() else shutil.which("deepspeed")
        return [str(exe), "--num_gpus", str(nproc), "--master_port", str(free_port()), *args]
    if launcher == "torchrun":
        exe = bindir / "torchrun" if (bindir / "torchrun").exists() else shutil.which("torchrun")
        return [str(exe), "--nproc_per_node", str(nproc), "--master_port", str(free_port()), *args]
    raise ValueError(launcher)


def run(recipe: str | Path, overrides: list[str], launcher: str = "python", nproc: int = 1, cwd: Path | None = None,
        timeout: float = 180) -> subprocess.CompletedProcess:
    """Run ``launch/pretrain.py`` to completion; stdout and stderr captured as text."""
    return subprocess.run(command(recipe, overrides, launcher, nproc), env=_env(), cwd=cwd or REPO,
                          capture_output=True, text=True, timeout=timeout)


def run_and_signal(recipe: str | Path, overrides: list[str], after_step: int, run_dir: Path,
                   timeout: float = 180) -> tuple[subprocess.CompletedProcess, float]:
    """Start a 1-process run, SIGTERM it once metrics.jsonl shows ``after_step``; returns (result, signal time)."""
    proc = subprocess.Popen(command(recipe, overrides), env=_env(), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    sent = None
    while time.monotonic() < deadline and proc.poll() is None:
        steps = [r["step"] for r in metrics(run_dir)] if (run_dir / "metrics.jsonl").exists() else []
        if steps and max(steps) >= after_step:
            proc.send_signal(signal.SIGTERM)
            sent = max(steps)
            break
        time.sleep(0.05)
    out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), sent


def describe(proc: subprocess.CompletedProcess) -> str:
    return f"rc={proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"


def check_ok(proc: subprocess.CompletedProcess, run_dir: Path, final_step: int) -> None:
    """Assert a run finished: rc 0, or the known gloo teardown abort after the final checkpoint."""
    latest = run_dir / "checkpoints" / "latest"
    finished = latest.exists() and latest.read_text().strip() == f"step_{final_step:010d}"
    if proc.returncode == 0:
        assert finished, describe(proc)
        return
    teardown_abort = "terminate called" in proc.stderr or "SIGABRT" in proc.stderr or proc.returncode in (-6, 134)
    assert finished and teardown_abort, describe(proc)


def metrics(run_dir: Path) -> list[dict[str, Any]]:
    """Every line of ``run_dir/metrics.jsonl`` (a partial last line is skipped)."""
    rows = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


def losses(run_dir: Path) -> dict[int, float]:
    """``{step: train/loss}`` from metrics.jsonl (the last record of a step wins)."""
    return {r["step"]: r["train/loss"] for r in metrics(run_dir) if "train/loss" in r}


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:010d}"


def _tensors(obj: Any, prefix: str, out: dict[str, torch.Tensor]) -> None:
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj.detach().cpu()
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _tensors(v, f"{prefix}/{k}", out)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _tensors(v, f"{prefix}/{i}", out)


def ds_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every DeepSpeed shard under ``directory/ds`` (module weights, fp32 master
    partitions, Adam moments), keyed ``file/path/in/the/dict``."""
    out: dict[str, torch.Tensor] = {}
    for path in sorted((directory / "ds").glob("*.pt")):
        _tensors(torch.load(path, map_location="cpu", weights_only=False), path.name, out)
    return out


def rank_state(directory: Path, rank: int = 0) -> dict[str, Any]:
    """``rank<r>_state.pt`` (the TrainState dict: step, tokens, data cursor, EMA, RNG)."""
    return torch.load(directory / f"rank{rank}_state.pt", map_location="cpu", weights_only=False)


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    """Same keys and bitwise-equal tensors (NaN-aware), with the first differing key in the message."""
    assert a.keys() == b.keys(), f"{what}: keys differ: {sorted(set(a) ^ set(b))[:5]}"
    assert a, f"{what}: no tensors"
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, f"{what}: {key}"
        assert torch.equal(a[key], b[key]), f"{what}: {key} differs (max |diff| " \
            f"{(a[key].double() - b[key].double()).abs().max().item():.3g})"


def flat_tensors(obj: Any) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    _tensors(obj, "", out)
    return out
