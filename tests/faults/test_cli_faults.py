"""Command-line faults: bad numbers, impossible devices and unwritable outputs are refused before any
work starts (exit 2, one line naming the flag, no traceback, nothing written)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch

from fault_helpers import TINY, assert_refused, call, data_overrides, run


BAD_VALUES = [  # (tool, argv, flag)
    ("eval_ppl", ["--ckpt", "X", "--num-t-samples", "0"], "--num-t-samples"),
    ("eval_ppl", ["--ckpt", "X", "--num-t-samples", "-1"], "--num-t-samples"),
    ("eval_ppl", ["--ckpt", "X", "--batch-size", "0"], "--batch-size"),
    ("eval_ppl", ["--ckpt", "X", "--max-batches", "0"], "--max-batches"),
    ("sample", ["--ckpt", "X", "--batch-size", "0"], "--batch-size"),
    ("sample", ["--ckpt", "X", "--num-samples", "0"], "--num-samples"),
    ("sample", ["--ckpt", "X", "--steps", "0"], "--steps"),
    ("gen_ppl", ["--ckpt", "X", "--num-samples", "0"], "--num-samples"),
    ("loo_probe", ["--ckpt", "X", "--out-dir", "o", "--steps", "0"], "--steps"),
    ("loo_probe", ["--ckpt", "X", "--out-dir", "o", "--trials", "0"], "--trials"),
    ("loo_probe", ["--ckpt", "X", "--out-dir", "o", "--positions", "0"], "--positions"),
    ("prepare_data", ["--source", "demo", "--tokenizer", "gpt2", "--seq-len", "8", "--out", "o",
                      "--valid-fraction", "2"], "--valid-fraction"),
    ("prepare_data", ["--source", "demo", "--tokenizer", "gpt2", "--seq-len", "8", "--out", "o",
                      "--valid-fraction", "1"], "--valid-fraction"),
    ("prepare_data", ["--source", "demo", "--tokenizer", "gpt2", "--seq-len", "0", "--out", "o"], "--seq-len"),
    ("train_tokenizer", ["--source", "demo", "--vocab-size", "0", "--out", "t.model"], "--vocab-size"),
    ("bench", ["data", "--shards", "X", "--num-batches", "0"], "--num-batches"),
    ("bench", ["data", "--shards", "X", "--batch-size", "0"], "--batch-size"),
]


@pytest.mark.parametrize("name,argv,flag", BAD_VALUES, ids=[f"{n}{' '.join(a[-2:])}" for n, a, _ in BAD_VALUES])
def test_bad_values_are_refused_by_argparse(name: str, argv: list[str], flag: str, tmp_path: Path, capsys,
                                            monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    code, out = call(name, argv, capsys)
    assert_refused(code, out, "error: argument", flag)
    assert not os.listdir(tmp_path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has CUDA")
@pytest.mark.parametrize("name", ["eval_ppl", "sample", "gen_ppl", "loo_probe"])
def test_cuda_without_cuda(name: str, capsys) -> None:
    code, out = call(name, ["--ckpt", "X", "--out-dir", "o", "--device", "cuda"] if name == "loo_probe"
                     else ["--ckpt", "X", "--device", "cuda"], capsys)
    assert_refused(code, out, "--device", "CUDA is not available")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has CUDA")
def test_fp16_training_without_cuda(tiny_data: Path, tmp_path: Path, capsys) -> None:
    """DeepSpeed's fp16 optimizer refuses a CPU with a traceback after the process group and engine are up;
    the launch refuses it first (exit 2, nothing written) and the dry run notes it (exit 0: GPU recipes are
    dry-run on CPU login nodes)."""
    from test_recipe_faults import pretrain_main

    argv = ["--recipe", "recipes/quickstart.yaml", "run.name=x", f"run.output_root={tmp_path}", *TINY,
            *data_overrides(tiny_data), "train.max_steps=1", "engine.precision=fp16"]
    code, out = pretrain_main([*argv, "--dry-run"], capsys)
    assert code == 0 and "#   note: engine.precision=fp16 needs CUDA GPUs" in out, out[-2000:]
    code, out = pretrain_main(argv, capsys)
    assert_refused(code, out, "engine.precision=fp16", "CUDA", "engine.precision=bf16 or fp32")
    assert not os.listdir(tmp_path)


UNWRITABLE = [  # (tool, argv with OUT for the output location, flag)
    ("eval_ppl", ["--ckpt", "X", "--out", "OUT"], "--out"),
    ("sample", ["--ckpt", "X", "--out", "OUT"], "--out"),
    ("gen_ppl", ["--ckpt", "X", "--out", "OUT"], "--out"),
    ("loo_probe", ["--ckpt", "X", "--out-dir", "OUT"], "--out-dir"),
    ("export_ckpt", ["X", "--out", "OUT"], "--out"),
    ("prepare_data", ["--source", "demo", "--tokenizer", "gpt2", "--seq-len", "8", "--out", "OUT"], "--out"),
    ("train_tokenizer", ["--source", "demo", "--vocab-size", "400", "--out", "OUT"], "--out"),
    ("bench", ["train", "--recipe", "recipes/quickstart.yaml", "--out", "OUT"], "--out"),
]


@pytest.mark.parametrize("name,argv,flag", UNWRITABLE, ids=[u[0] for u in UNWRITABLE])
def test_unwritable_output_is_refused_before_the_work(name: str, argv: list[str], flag: str, tmp_path: Path,
                                                      capsys) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    out_path = str(blocker / "sub" / "result")
    code, out = call(name, [out_path if a == "OUT" else a for a in argv], capsys)
    assert_refused(code, out, flag, str(blocker))
    assert sorted(os.listdir(tmp_path)) == ["a_file"]


def test_unwritable_run_directory(tiny_data: Path, tmp_path: Path, capsys) -> None:
    from test_recipe_faults import pretrain_main

    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    code, out = pretrain_main(["--recipe", "recipes/quickstart.yaml", "run.name=x", f"run.output_root={blocker}",
                               *TINY, *data_overrides(tiny_data), "train.max_steps=1"], capsys)
    assert_refused(code, out, "run.output_root", str(blocker))


def test_judge_directory_that_is_neither_run_nor_hf_model(trained_run: Path, tmp_path: Path, capsys) -> None:
    judge = tmp_path / "judge"
    judge.mkdir()
    code, out = call("gen_ppl", ["--ckpt", str(trained_run), "--num-samples", "1", "--steps", "2",
                                 "--judge", str(judge)], capsys)
    assert_refused(code, out, "--judge", str(judge), "config.json")


def test_loo_probe_positions_beyond_the_sequence(trained_run: Path, tmp_path: Path, capsys) -> None:
    code, out = call("loo_probe", ["--ckpt", str(trained_run), "--out-dir", str(tmp_path / "p"),
                                   "--positions", "1000"], capsys)
    assert_refused(code, out, "--positions", "1000")


def test_rendezvous_port_collision(tiny_data: Path, tmp_path: Path) -> None:
    """A second run on a busy MASTER_PORT: one line naming the port and the option that changes it."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = run(["launch/pretrain.py", "--recipe", "recipes/quickstart.yaml", "run.name=x",
                    f"run.output_root={tmp_path}", *TINY, *data_overrides(tiny_data), "train.max_steps=1"],
                   timeout=180, extra_env={"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
                                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    assert_refused(proc.returncode, proc.stdout + proc.stderr, str(port), "--master_port", "MASTER_PORT")


@pytest.mark.parametrize("sweep,culprit", [(["temperature=1.0,1", "steps=2"], "twice"),
                                           (["steps=2,0"], "sampler.num_steps must be >= 1")])
def test_gen_ppl_sweep_is_checked_whole_before_any_sampling(trained_run: Path, tmp_path: Path, capsys,
                                                            sweep: list[str], culprit: str) -> None:
    """A repeated setting was a traceback after the first rows were computed, a bad last value cost the grid
    before it: every setting is now built before the judge loads (the judge here is never needed)."""
    out_dir = tmp_path / "sweep"
    code, out = call("gen_ppl", ["--ckpt", str(trained_run), "--num-samples", "2", "--judge", "no-such-judge",
                                 "--out-dir", str(out_dir), "--sweep", *sweep], capsys)
    assert_refused(code, out, culprit)
    assert not out_dir.exists()


def test_gen_ppl_sweep_rows_are_keyed_by_every_override_and_the_device(trained_run: Path) -> None:
    """A data.seq_len=16 override reused the rows of full-length samples: the key held only the sampler."""
    import argparse

    from fault_helpers import tool

    from udmtrain.eval.frontier import context_id
    from udmtrain.train import inference as inf

    class Judge:
        def identity(self):
            return {"kind": "fake", "name_or_path": "judge"}

    args = argparse.Namespace(num_samples=2, seed=0, batch_size=None, judge="judge", judge_dtype="float32",
                              prefix_eos=False, mauve_references=None)
    key = lambda loaded: context_id(tool("gen_ppl").sweep_context(loaded, Judge(), args))  # noqa: E731
    plain = inf.load_for_inference(trained_run)
    assert key(plain) == key(inf.load_for_inference(trained_run))  # what a rerun reuses
    assert key(plain) != key(inf.load_for_inference(trained_run, ["data.seq_len=16"]))
    assert key(plain) != key(inf.with_sampler(plain, ["sampler.cache=false"]))


def test_samples_of_other_settings_do_not_overwrite_each_other(run_copy: Path, capsys) -> None:
    """The default file was <step>-seed<K>.jsonl whatever the sampler settings: a second run replaced the first."""
    for steps in ("2", "3", "2"):
        code, out = call("sample", ["--ckpt", str(run_copy), "--num-samples", "1", "--steps", steps, "--quiet"], capsys)
        assert code == 0, out
    names = sorted(p.name for p in (run_copy / "samples").iterdir())
    assert len(names) == 2 and all(n.startswith("step_0000000002-ancestral-") and n.endswith("-seed0.jsonl")
                                   for n in names), names  # the rerun of steps=2 rewrote its own file only
