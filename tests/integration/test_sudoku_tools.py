"""Sudoku end to end on tiny real runs (CPU): prepare_data --source sudoku, 3-step MDLM, AUDM and AR runs
of the shipped Sudoku recipes through launch/pretrain.py, then eval_sudoku (single setting, a sweep and
which of its rows a rerun may reuse, an output that cannot be written, the AR run's left-to-right
decoding) and eval_ppl, whose token count must leave the prompt out."""

import csv
import json
import sys
from pathlib import Path

import pytest
from test_eval_tools import REPO, run

sys.path.insert(0, str(REPO / "tests" / "faults"))

from fault_helpers import assert_refused, call  # noqa: E402  (in-process tool runs, as the fault cases do)

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


def test_eval_sudoku_sweep_reuses_only_rows_of_the_same_context(sudoku_runs, tmp_path, capsys):
    """A rerun reuses a row only when the checkpoint, the puzzles (--data/--split/--num-puzzles), --seed and
    --batch-size are the same; it used to hand back the rows of another data set or checkpoint."""
    out = tmp_path / "sweep.json"
    base = ["--ckpt", str(sudoku_runs / "runs" / "audm"), "--num-puzzles", "4", "--batch-size", "4",
            "--sweep", "steps=2", "--out", str(out)]

    def sweep(*extra):
        code, output = call("eval_sudoku", [*base, *extra], capsys)
        assert code == 0, output[-3000:]
        return output, json.loads(out.read_text())

    output, first = sweep()
    assert "0 reused" in output and first["rows"][0]["num_puzzles"] == 4
    output, again = sweep()
    assert "1 reused" in output and again["rows"] == first["rows"]
    variants = [["--num-puzzles", "3"], ["--split", "train"], ["--seed", "1"], ["--batch-size", "2"],
                ["--ckpt", str(sudoku_runs / "runs" / "mdlm")], ["sampler.temperature=0.5"]]
    for extra in variants:
        output, report = sweep(*extra)
        assert "0 reused" in output and "1 to compute" in output, (extra, output[-2000:])
        assert report["context_id"] != first["context_id"] and len(report["rows"]) == 1
    assert sweep("--num-puzzles", "3")[1]["rows"][0]["num_puzzles"] == 3  # each context keeps its own row
    rows = list(csv.DictReader(open(out.with_suffix(".csv"))))
    assert len(rows) == 1 + len(variants) and len({r["context_id"] for r in rows}) == len(rows)


def test_eval_sudoku_unwritable_output_is_refused_before_the_work(sudoku_runs, tmp_path, capsys):
    """An --out that is a directory (or, for a sweep, OUT.csv that is one) used to fail with
    IsADirectoryError after the whole evaluation; a sweep CSV without context_id (an older eval_sudoku's)
    cannot be matched to its settings and is refused too."""
    ckpt = ["--ckpt", str(sudoku_runs / "runs" / "mdlm"), "--num-puzzles", "2"]
    (tmp_path / "report").mkdir()
    code, output = call("eval_sudoku", [*ckpt, "--out", str(tmp_path / "report")], capsys)
    assert_refused(code, output, "--out", str(tmp_path / "report"), "is a directory")
    (tmp_path / "sweep.csv").mkdir()
    code, output = call("eval_sudoku", [*ckpt, "--sweep", "steps=2", "--out", str(tmp_path / "sweep.json")], capsys)
    assert_refused(code, output, "--out", str(tmp_path / "sweep.csv"), "is a directory")
    (tmp_path / "old.csv").write_text("sampler,steps,solved\nrecipe,2,1.0\n")
    code, output = call("eval_sudoku", [*ckpt, "--sweep", "steps=2", "--out", str(tmp_path / "old.json")], capsys)
    assert_refused(code, output, "--out", "old.csv", "context_id", "choose another --out")
    assert "solved" not in output  # nothing was evaluated
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.csv", "report", "sweep.csv"]


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
