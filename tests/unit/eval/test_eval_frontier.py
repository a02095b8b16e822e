"""eval/frontier.py: resumable sweep CSV and the frontier PNG."""

from __future__ import annotations

import csv
import math

import pytest

pytest.importorskip("matplotlib")

from udmtrain.eval.frontier import grid, plot_frontier, read_rows, run_sweep, setting_key  # noqa: E402

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
