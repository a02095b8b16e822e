"""``tools/bench.py``: a real 2-step training benchmark on tiny demo shards (subprocess: it starts a
process group), its JSON fields and their arithmetic; ``bench.py data`` dispatches to bench_data."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SEQ_LEN, VOCAB = 32, 400
TINY = ["model.hidden_size=32", "model.num_blocks=1", "model.num_heads=2", "model.cond_dim=16",
        f"data.seq_len={SEQ_LEN}", "data.num_workers=0", "engine.micro_batch_size=2", "engine.global_batch_size=4",
        "engine.precision=fp32"]


def _env() -> dict[str, str]:
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1",
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions")))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _run(args: list[str], cwd: Path = REPO, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench_data")
    tok = out / "tokenizer.model"
    for args in (["tools/train_tokenizer.py", "--source", "demo", "--vocab-size", str(VOCAB), "--out", str(tok)],
                 ["tools/prepare_data.py", "--source", "demo", "--tokenizer", str(tok), "--seq-len", str(SEQ_LEN),
                  "--no-progress", "--out", str(out)]):
        proc = _run(args)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _data_overrides(d: Path) -> list[str]:
    return [f"data.train_shards={d}/train-*.tar", f"data.valid_shards={d}/valid-*.tar",
            f"tokenizer={{name: sentencepiece, path: {d}/tokenizer.model}}"]


def test_bench_train_reports_throughput_split_and_mfu(shards, tmp_path):
    out = tmp_path / "bench.json"
    proc = _run([str(REPO / "tools/bench.py"), "train", "--recipe", str(REPO / "recipes/quickstart.yaml"),
                 "--steps", "2", "--warmup", "1",
                 "--out", str(out), *TINY, *_data_overrides(shards)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    printed = json.loads(proc.stdout[proc.stdout.index("{\n"):])
    assert printed == report
    assert not list(tmp_path.glob("runs")), "the bench must not write a run directory"
    for key in ("tokens_per_s", "step_time_s", "time_split_s", "flops_per_token", "peak_flops", "peak_flops_bf16",
                "peak_flops_fp32", "mfu", "parameters", "precision", "world_size", "device", "torch_version",
                "deepspeed_version"):
        assert key in report, key
    assert (report["precision"], report["world_size"], report["steps"], report["warmup_steps"]) == ("fp32", 1, 2, 1)
    assert report["tokens"] == 2 * 4 * SEQ_LEN  # 2 steps x global batch 4 x 32 tokens, no padding
    assert math.isclose(report["tokens_per_s"], report["tokens"] / report["seconds"], rel_tol=1e-12)
    split = report["time_split_s"]
    assert set(split) == {"data", "forward", "backward", "optimizer"} and all(v > 0 for v in split.values())
    assert sum(split.values()) <= report["step_time_s"] * (1 + 1e-9)
    assert report["peak_flops"] == report["peak_flops_fp32"] > 0 and report["peak_flops_bf16"] > 0
    assert math.isclose(report["mfu"], report["flops_per_token"] * report["tokens_per_s"] / report["peak_flops"],
                        rel_tol=1e-12)
    assert report["deepspeed_version"] and report["torch_version"] and report["device"]
    # parameter count and FLOPs/token of the same tiny network, counted here independently
    from udmtrain.config import load_recipe
    from udmtrain.models.flops import flops_per_token
    from udmtrain.train.build import build_components

    cfg = load_recipe(str(REPO / "recipes/quickstart.yaml"), [*TINY, *_data_overrides(shards)])
    model = build_components(cfg, VOCAB, with_sampler=False).model
    assert report["parameters"] == sum(p.numel() for p in model.parameters())
    assert report["flops_per_token"] == flops_per_token(model, SEQ_LEN) > 6 * 32 * 32 * 4  # > 6 x qkv+out+mlp


def test_bench_data_dispatches_to_bench_data(shards):
    proc = _run(["tools/bench.py", "data", "--shards", str(shards), "--batch-size", "4", "--num-batches", "3",
                 "--num-workers", "0"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["bench"] == "data" and report["seq_len"] == SEQ_LEN and report["num_batches"] == 3


def test_bench_train_bad_recipe_is_a_clear_error(tmp_path):
    proc = _run(["tools/bench.py", "train", "--recipe", str(tmp_path / "nope.yaml")])
    assert proc.returncode == 2 and "nope.yaml" in proc.stderr, proc.stderr[-2000:]


def test_bench_train_compare_bare_times_both_interleaved(shards, tmp_path):
    out = tmp_path / "bench.json"
    proc = _run([str(REPO / "tools/bench.py"), "train", "--recipe", str(REPO / "recipes/quickstart.yaml"),
                 "--steps", "2", "--warmup", "1", "--compare-bare", "--out", str(out), *TINY,
                 *_data_overrides(shards)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    bare = report["bare"]
    assert len(bare["step_times_s"]) == len(report["step_times_s"]) == 2
    assert math.isclose(bare["tokens_per_s"], 2 * 4 * SEQ_LEN / sum(bare["step_times_s"]), rel_tol=1e-9)
    assert math.isclose(report["full_over_bare"], report["full_step_time_median_s"] / bare["step_time_s"],
                        rel_tol=1e-12) and report["full_over_bare"] > 0
