"""Sudoku end to end on tiny real runs (CPU): prepare_data --source sudoku, 3-step MDLM, AUDM and AR runs
of the shipped Sudoku recipes through launch/pretrain.py, then eval_sudoku (single setting, a sweep, the
AR run's left-to-right decoding) and eval_ppl, whose token count must leave the prompt out."""

import csv
import json
from pathlib import Path

import pytest
from test_eval_tools import REPO, run

TINY = ["data.num_workers=0", "model.hidden_size=32", "model.num_blocks=1", "model.num_heads=2",
        "model.cond_dim=16", "engine.global_batch_size=4", "engine.micro_batch_size=4", "engine.precision=fp32",
        "engine.zero_stage=1", "train.max_steps=3", "train.log_every=1", "checkpoint.every=3", "eval.every=3",
        "eval.num_batches=null"]


@pytest.fixture(scope="module")
def sudoku_runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("sudoku")
    run(REPO / "tools/prepare_data.py", "--source", "sudoku", "--num-puzzles", 40, "--min-clues", 60,
        "--max-clues", 70, "--valid-fraction", 0.2, "--samples-per-shard", 16, "--num-workers", 0,
        "--no-progress", "--out", d / "data")
    common = [f"data.train_shards={d}/data/train-*.tar", f"data.valid_shards={d}/data/valid-*.tar",
              f"run.output_root={d}/runs", *TINY]
    for name in ("mdlm", "audm", "ar"):
        tiny = [o for o in common if not (name == "ar" and o.startswith("model.cond_dim"))]  # AR: no time input
        run(REPO / "launch/pretrain.py", "--recipe", REPO / "recipes" / f"sudoku_{name}.yaml", f"run.name={name}",
            *tiny)
    return d


@pytest.mark.parametrize("name,sampler", [("mdlm", "confidence"), ("audm", "pc_gibbs")])
def test_eval_sudoku_single_setting(sudoku_runs, name, sampler):
    out = sudoku_runs / f"{name}.json"
    run(REPO / "tools/eval_sudoku.py", "--ckpt", sudoku_runs / "runs" / name, "--num-puzzles", 5, "--steps", 4,
        "--sampler", sampler, "--batch-size", 3, "--out", out)
    report = json.loads(out.read_text())
    assert report["num_puzzles"] == 5 and report["nfe"] <= 4 and report["sampler"]["name"] == sampler
    for key in ("solved", "exact", "valid_grid", "cell_accuracy"):
        assert 0.0 <= report[key] <= 1.0 and f"{key}_stderr" in report
    for ex in report["examples"]:  # graded against the stored puzzles; the output is the solution part
        assert len(ex["output"]) == 81 and ex["quiz"].replace("0", "") and len(ex["solution"]) == 81


def test_eval_sudoku_sweep_writes_csv_and_png(sudoku_runs):
    out = sudoku_runs / "sweep" / "sweep.json"
    run(REPO / "tools/eval_sudoku.py", "--ckpt", sudoku_runs / "runs" / "audm", "--num-puzzles", 4,
        "--sweep", "steps=2,4", "sampler=ancestral,greedy,pc_gibbs:k_parallel=2", "--out", out)
    rows = list(csv.DictReader(open(out.with_suffix(".csv"))))
    assert [(r["sampler"], r["steps"]) for r in rows] == [
        (s, n) for s in ("ancestral", "greedy", "pc_gibbs:k_parallel=2") for n in ("2", "4")]
    assert out.with_suffix(".png").stat().st_size > 0
    bad = run(REPO / "tools/eval_sudoku.py", "--ckpt", sudoku_runs / "runs" / "mdlm", "--num-puzzles", 2,
              "--sweep", "steps=2", "sampler=pc_gibbs", "--out", sudoku_runs / "bad.json", check=False)
    assert bad.returncode == 2 and not Path(sudoku_runs / "bad.csv").exists()  # refused before any run


def test_eval_ppl_counts_only_solution_tokens(sudoku_runs):
    out = sudoku_runs / "ppl.json"
    run(REPO / "tools/eval_ppl.py", "--ckpt", sudoku_runs / "runs" / "mdlm", "--no-ema", "--out", out)
    (result,) = json.loads(out.read_text())["results"]
    assert result["num_sequences"] == 8 and result["num_tokens"] == 8 * 82  # 81 solution digits + END


def test_eval_sudoku_decodes_an_ar_run_left_to_right(sudoku_runs):
    out = sudoku_runs / "ar.json"
    run(REPO / "tools/eval_sudoku.py", "--ckpt", sudoku_runs / "runs" / "ar", "--num-puzzles", 3, "--out", out)
    report = json.loads(out.read_text())
    assert report["sampler"] == {"name": "autoregressive", "temperature": 0.0, "top_p": 1.0, "greedy": True}
    assert report["nfe"] == 82 and report["num_puzzles"] == 3  # one call per solution cell and the END token
    assert all(len(ex["output"]) == 81 for ex in report["examples"])  # 3 steps: graded, not expected to solve
    bad = run(REPO / "tools/eval_sudoku.py", "--ckpt", sudoku_runs / "runs" / "ar", "--steps", 4,
              "--out", sudoku_runs / "ar_bad.json", check=False)
    assert bad.returncode == 2 and "autoregressive run" in bad.stderr and "--steps" in bad.stderr
