"""eval/frontier.py: resumable sweep CSV and the frontier PNG."""

from __future__ import annotations

import csv
import math

import pytest

pytest.importorskip("matplotlib")

from udmtrain.eval.frontier import (  # noqa: E402
    context_id, grid, plot_frontier, read_rows, run_sweep, setting_key, typed)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class Interrupted(RuntimeError):
    pass


def make_scorer(calls, fail_after=None):
    def generate_and_score(setting):
        if fail_after is not None and len(calls) >= fail_after:
            raise Interrupted("killed")
        calls.append(setting_key(setting))
        T, p, n = setting["temperature"], setting["top_p"], setting["steps"]
        return {"gen_ppl": math.exp(3 * T * p + 8 / n), "entropy": 4 + T * p, "num_samples": 4}
    return generate_and_score


def test_sweep_resumes_without_recomputing(tmp_path):
    settings = grid(temperatures=[0.8, 0.9, 1.0], top_ps=[0.9, 1.0], steps=[8, 16])
    csv_path = tmp_path / "sweep.csv"
    first = []
    with pytest.raises(Interrupted):
        run_sweep(settings, make_scorer(first, fail_after=5), csv_path)
    assert len(first) == 5 and len(read_rows(csv_path)) == 5
    # a crash in the middle of a write leaves a partial line: it is dropped on restart
    with open(csv_path, "a") as f:
        f.write("16,0.8,1.0,12.")
    second = []
    rows = run_sweep(settings, make_scorer(second), csv_path, plot_path=tmp_path / "frontier.png")
    assert set(second).isdisjoint(first) and len(first) + len(second) == len(settings)
    keys = [setting_key(r) for r in rows]
    assert len(keys) == len(set(keys)) == len(settings)
    with open(csv_path, newline="") as f:
        header = next(csv.reader(f))
    assert header[:3] == ["steps", "temperature", "top_p"] and "gen_ppl" in header
    # a third run computes nothing
    third = []
    run_sweep(settings, make_scorer(third), csv_path)
    assert third == []
    png = (tmp_path / "frontier.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 1000


def test_plot_and_errors(tmp_path):
    rows = [{"steps": 8, "temperature": 1.0, "top_p": 1.0, "gen_ppl": 50.0, "entropy": 5.5},
            {"steps": 8, "temperature": 0.9, "top_p": 1.0, "gen_ppl": 30.0, "entropy": 5.2}]
    plot_frontier(rows, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes().startswith(PNG_MAGIC)
    with pytest.raises(ValueError, match="appears twice"):
        run_sweep([rows[0], rows[0]], lambda s: {"gen_ppl": 1.0}, tmp_path / "dup.csv")
    with pytest.raises(KeyError, match="lacks the key field"):
        run_sweep([{"steps": 8}], lambda s: {}, tmp_path / "k.csv")
    with pytest.raises(ValueError, match="not in the header"):
        run_sweep(grid(temperatures=[0.9, 1.0]), lambda s: {"gen_ppl": 1.0, f"x{s['temperature']}": 1},
                  tmp_path / "h.csv")


def test_a_changed_context_recomputes_and_says_what_was_reused(tmp_path):
    settings = grid(temperatures=[0.9, 1.0], top_ps=[1.0], steps=[8])
    csv_path = tmp_path / "sweep.csv"
    lines, first, second, third = [], [], [], []
    ctx32 = {"num_samples": 32, "seed": 0, "judge": "runs/quickstart-ar"}
    rows = run_sweep(settings, make_scorer(first), csv_path, context=ctx32, log=lines.append)
    assert len(first) == 2 and [r["steps"] for r in rows] == [8, 8]  # numbers, not strings
    assert isinstance(rows[0]["gen_ppl"], float) and rows[0]["context_id"] == context_id(ctx32)
    assert lines[-1].endswith("sweep of 2 setting(s): 0 reused from " + str(csv_path) + ", 2 to compute")
    ctx64 = {**ctx32, "num_samples": 64}  # e.g. another --num-samples: nothing may be reused
    lines.clear()
    rows = run_sweep(settings, make_scorer(second), csv_path, context=ctx64, log=lines.append)
    assert len(second) == 2 and len(rows) == 2 and {r["context_id"] for r in rows} == {context_id(ctx64)}
    assert any("2 row(s) of other settings (num_samples 32 -> 64) kept, not reused" in x for x in lines)
    assert len(read_rows(csv_path)) == 4  # the old rows stay in the file
    lines.clear()
    rows = run_sweep(settings, make_scorer(third), csv_path, context=dict(ctx32), log=lines.append)
    assert third == [] and len(rows) == 2 and "2 reused" in lines[-1]  # back to the first settings: reused
    assert typed({"a": "16", "b": "0.5", "c": "", "d": "x"}) == {"a": 16, "b": 0.5, "c": None, "d": "x"}


def test_a_csv_without_context_column_is_refused_in_one_line(tmp_path):
    csv_path = tmp_path / "old.csv"
    run_sweep(grid(temperatures=[1.0], steps=[8]), lambda s: {"gen_ppl": 2.0}, csv_path)
    with pytest.raises(ValueError, match="no context_id column"):
        run_sweep(grid(temperatures=[1.0], steps=[8]), lambda s: {"gen_ppl": 2.0}, csv_path, context={"n": 1})
