"""Sudoku generator, solver and CSV reader (udmtrain.data.sudoku).

Uniqueness is checked by an independent, deliberately naive brute-force counter written here (first
empty cell, digits 1-9, a full unit scan per try), not by the module's bitmask solver.
"""

from __future__ import annotations

import pytest

from udmtrain.data import sudoku as S
from udmtrain.data.errors import DataError


def _ok(grid: list[int], i: int, d: int) -> bool:
    r, c = divmod(i, 9)
    for k in range(9):
        if grid[r * 9 + k] == d or grid[k * 9 + c] == d:
            return False
    br, bc = 3 * (r // 3), 3 * (c // 3)
    return all(grid[(br + a) * 9 + bc + b] != d for a in range(3) for b in range(3))


def naive_count(puzzle: str, limit: int = 2) -> int:
    grid = [int(ch) for ch in puzzle]
    for i, d in enumerate(grid):  # the clues themselves must not clash
        if d:
            grid[i] = 0
            if not _ok(grid, i, d):
                return 0
            grid[i] = d

    def rec() -> int:
        try:
            i = grid.index(0)
        except ValueError:
            return 1
        found = 0
        for d in range(1, 10):
            if _ok(grid, i, d):
                grid[i] = d
                found += rec()
                grid[i] = 0
                if found >= limit:
                    break
        return found

    return rec()


def _naive_valid(grid: str) -> bool:
    units = [[r * 9 + c for c in range(9)] for r in range(9)] + [[r * 9 + c for r in range(9)] for c in range(9)]
    units += [[(br + a) * 9 + bc + b for a in range(3) for b in range(3)] for br in (0, 3, 6) for bc in (0, 3, 6)]
    return all(sorted(grid[i] for i in u) == list("123456789") for u in units)


@pytest.mark.parametrize("lo,hi", [(60, 75), (36, 45)])
def test_generated_puzzles_have_exactly_one_solution(lo, hi):
    for index in range(12):
        p = S.make_puzzle(7, index, lo, hi)
        assert lo <= p.num_clues <= hi
        assert _naive_valid(p.solution)
        assert S.consistent(p.quiz, p.solution)
        assert naive_count(p.quiz, limit=2) == 1, p.quiz


def test_generator_is_deterministic_per_seed_and_index():
    a = [S.make_puzzle(3, i, 50, 60) for i in range(5)]
    assert a == [S.make_puzzle(3, i, 50, 60) for i in range(5)]
    assert S.make_puzzle(3, 2, 50, 60) == a[2]  # any index on its own
    assert a != [S.make_puzzle(4, i, 50, 60) for i in range(5)]
    assert len({p.quiz for p in a}) == 5


def test_solver_counts_agree_with_naive_counter():
    p = S.make_puzzle(1, 0, 30, 40)
    assert S.count_solutions(p.quiz) == naive_count(p.quiz) == 1
    assert S.solve(p.quiz) == [p.solution]
    # the empty grid has many solutions; a repeated clue has none
    assert S.count_solutions("0" * 81) == naive_count("0" * 81) == 2
    clash = "11" + "0" * 79
    assert S.count_solutions(clash) == naive_count(clash) == 0


def test_random_grids_are_valid_and_varied():
    grids = {S.random_grid(S.puzzle_rng(0, i)) for i in range(50)}
    assert len(grids) == 50 and all(_naive_valid(g) and S.is_valid_solution(g) for g in grids)


def test_clue_bounds_are_checked():
    with pytest.raises(DataError, match="min-clues"):
        S.make_puzzle(0, 0, 10, 20)


def test_csv_round_trip(tmp_path):
    puzzles = [S.make_puzzle(5, i, 40, 60) for i in range(6)]
    path = str(tmp_path / "p.csv")
    S.write_csv(path, puzzles)
    assert list(S.read_csv(path)) == puzzles
    assert list(S.read_csv(path, limit=2)) == puzzles[:2]


def test_csv_errors_name_file_and_line(tmp_path):
    good = S.make_puzzle(5, 0, 40, 60)
    bad_solution = good.solution[:-2] + good.solution[-1] + good.solution[-2]
    cases = {
        "short": f"quizzes,solutions\n{good.quiz},{good.solution}\n{good.quiz[:80]},{good.solution}\n",
        "invalid": f"quizzes,solutions\n{good.quiz},{good.solution}\n{'0' * 81},{bad_solution}\n",
        "clue": f"quizzes,solutions\n{good.quiz},{good.solution}\n"
                f"{S.make_puzzle(5, 1, 40, 60).quiz},{good.solution}\n",
    }
    for name, text in cases.items():
        path = tmp_path / f"{name}.csv"
        path.write_text(text)
        with pytest.raises(DataError, match=f"{path}:3"):
            list(S.read_csv(str(path)))
    header = tmp_path / "header.csv"
    header.write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match="quizzes"):
        list(S.read_csv(str(header)))


def test_encode_pair_layout():
    p = S.make_puzzle(2, 0, 50, 60)
    ids, prompt = S.encode_pair(p)
    assert ids.shape == (S.SEQ_LEN,) == (164,) and prompt.sum() == S.PROMPT_LEN == 82
    assert "".join(map(str, ids[:81])) == p.quiz and ids[81] == S.SEP_ID and ids[-1] == S.END_ID
    assert S.decode_solution(ids) == p.solution
    assert prompt[:82].all() and not prompt[82:].any()
