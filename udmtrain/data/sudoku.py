"""Sudoku puzzles without a network: random complete grids, a solution counter, clue removal, CSV I/O.

A grid is a string of 81 characters ``"0"-"9"`` in row-major order, ``"0"`` = blank (puzzles only).

* **Complete grids** come from randomized backtracking (:func:`random_grid`): the diagonal boxes get
  random permutations, then cells are filled in MRV order (the empty cell with the fewest candidates
  first), each trying its candidates in a random order. Every
  complete grid is reachable, but the draw is not exactly uniform over the 6.67e21 grids (backtracking
  visits some branches more often); it is not a relabelling of one base grid, so puzzles do not share a
  hidden structure a network could exploit.
* **Solution counting** (:func:`count_solutions`): bitmask backtracking with MRV and naked singles,
  stopping at ``limit`` solutions (2 decides uniqueness).
* **Clue removal** (:func:`make_puzzle`): draw a target clue count uniformly in ``[min_clues,
  max_clues]``, visit the cells in random order and blank each one unless the puzzle would stop having
  a unique solution. Removing cell c (digit d) from a unique puzzle keeps it unique iff no other
  candidate d' of c (given the remaining clues) leads to a solution; when d is c's only candidate no
  solver call is needed, which makes easy (many-clue) puzzles fast. A grid that cannot reach
  ``max_clues`` is dropped and another one is drawn.
* **Determinism**: puzzle ``i`` of seed ``s`` uses its own generator seeded by ``(s, i)``, so a puzzle
  set is reproducible and any range of it can be generated independently (in worker processes).
* **CSV** (:func:`read_csv`): the common public format, a header ``quizzes,solutions`` and rows of two
  81-digit strings; every row is checked (the solution is a valid grid that agrees with the clues) and
  an error names ``file:line``.

The sequence layout for training (:func:`encode_pair`) lives here too: puzzle digits, a separator,
solution digits, an end token; the puzzle and separator form the prompt.
"""

from __future__ import annotations

import csv
import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from udmtrain.data.errors import DataError

N_CELLS = 81
ALL = 0x3FF & ~1  # bits 1..9
ROW = [i // 9 for i in range(N_CELLS)]
COL = [i % 9 for i in range(N_CELLS)]
BOX = [(i // 27) * 3 + (i % 9) // 3 for i in range(N_CELLS)]
# ids of the fixed "sudoku" vocabulary (udmtrain.data.tokenizers.SudokuTokenizer): digits are their own id
PAD_ID, SEP_ID, END_ID = 10, 11, 12
VOCAB_SIZE = 13
SEQ_LEN = 2 * N_CELLS + 2  # puzzle + SEP + solution + END
PROMPT_LEN = N_CELLS + 1  # puzzle + SEP
_DIGITS = [[d for d in range(1, 10) if m >> d & 1] for m in range(1 << 10)]
_POPCOUNT = [bin(m).count("1") for m in range(1 << 10)]


def _masks(cells: list[int]) -> tuple[list[int], list[int], list[int]] | None:
    """Used-digit bitmasks of rows, columns and boxes; None when a clue repeats in a unit."""
    rows, cols, boxes = [0] * 9, [0] * 9, [0] * 9
    for i, d in enumerate(cells):
        if d:
            bit = 1 << d
            r, c, b = ROW[i], COL[i], BOX[i]
            if (rows[r] | cols[c] | boxes[b]) & bit:
                return None
            rows[r] |= bit
            cols[c] |= bit
            boxes[b] |= bit
    return rows, cols, boxes


def _search(cells: list[int], rows: list[int], cols: list[int], boxes: list[int], empties: list[int], limit: int,
            rng: random.Random | None, out: list[list[int]]) -> int:
    """Backtracking with MRV over the blank cells ``empties`` (``cells``, the masks and ``empties`` are
    modified in place and restored, ``empties`` possibly reordered); appends found grids to ``out`` (at
    most ``limit``), returns how many were found. ``rng`` shuffles candidate order (generation)."""
    best, best_mask, best_count = -1, 0, 10
    for j, i in enumerate(empties):
        mask = ALL & ~(rows[ROW[i]] | cols[COL[i]] | boxes[BOX[i]])
        n = _POPCOUNT[mask]
        if n < best_count:
            best, best_mask, best_count = j, mask, n
            if n <= 1:
                break
    if best < 0:
        out.append(list(cells))
        return 1
    if best_count == 0:
        return 0
    i = empties[best]
    empties[best] = empties[-1]
    empties.pop()
    digits = _DIGITS[best_mask]
    if rng is not None and best_count > 1:
        digits = list(digits)
        rng.shuffle(digits)
    r, c, b = ROW[i], COL[i], BOX[i]
    found = 0
    for d in digits:
        bit = 1 << d
        cells[i] = d
        rows[r] |= bit
        cols[c] |= bit
        boxes[b] |= bit
        found += _search(cells, rows, cols, boxes, empties, limit - found, rng, out)
        rows[r] &= ~bit
        cols[c] &= ~bit
        boxes[b] &= ~bit
        if found >= limit:
            break
    cells[i] = 0
    empties.append(i)
    return found


def _blanks(cells: list[int]) -> list[int]:
    """Indices of the blank (0) cells."""
    return [i for i in range(N_CELLS) if cells[i] == 0]


def to_cells(grid: str) -> list[int]:
    """``[81]`` ints of an 81-character digit string (``"."`` is read as a blank)."""
    return [0 if ch == "." else ord(ch) - 48 for ch in grid]


def to_string(cells: list[int]) -> str:
    """The 81-character digit string of ``[81]`` ints."""
    return "".join(chr(48 + d) for d in cells)


def solve(grid: str, limit: int = 2) -> list[str]:
    """Up to ``limit`` solutions of ``grid`` (an 81-digit string, 0 = blank); [] if it has none."""
    cells = to_cells(grid)
    masks = _masks(cells)
    if masks is None:
        return []
    out: list[list[int]] = []
    _search(cells, *masks, _blanks(cells), limit, None, out)
    return [to_string(s) for s in out]


def count_solutions(grid: str, limit: int = 2) -> int:
    """Number of solutions of ``grid``, counted up to ``limit`` (2: 0 = none, 1 = unique, 2 = several)."""
    return len(solve(grid, limit))


def is_valid_solution(grid: str) -> bool:
    """True when ``grid`` is a complete grid with every digit once per row, column and box."""
    if len(grid) != N_CELLS or not grid.isdigit() or "0" in grid:
        return False
    return _masks(to_cells(grid)) is not None


def consistent(puzzle: str, grid: str) -> bool:
    """True when ``grid`` keeps every clue (non-zero digit) of ``puzzle``."""
    return all(p == "0" or p == g for p, g in zip(puzzle, grid))


def puzzle_rng(seed: int, index: int) -> random.Random:
    """The generator of puzzle ``index`` of seed ``seed`` (independent streams per index)."""
    return random.Random(int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0]))


def random_grid(rng: random.Random) -> str:
    """A random complete grid (see the module docstring).

    The three diagonal boxes share no row, column or box, so they are filled first with independent
    random permutations (every such triple extends to a complete grid); the other 54 cells follow by
    randomized MRV backtracking. Every complete grid can come out.
    """
    cells, rows, cols, boxes = [0] * N_CELLS, [0] * 9, [0] * 9, [0] * 9
    for box in (0, 4, 8):
        digits = list(range(1, 10))
        rng.shuffle(digits)
        for k, d in enumerate(digits):
            i = (box // 3) * 27 + (box % 3) * 3 + (k // 3) * 9 + k % 3
            cells[i] = d
            rows[ROW[i]] |= 1 << d
            cols[COL[i]] |= 1 << d
            boxes[BOX[i]] |= 1 << d
    grids: list[list[int]] = []
    _search(cells, rows, cols, boxes, _blanks(cells), 1, rng, grids)  # the first completion, random candidate order
    return to_string(grids[0])


def _remove_clues(solution: list[int], target: int, rng: random.Random) -> list[int]:
    """Blank cells of ``solution`` in random order down to ``target`` clues, keeping a unique solution."""
    cells = list(solution)
    rows, cols, boxes = _masks(cells)  # type: ignore[misc]
    order = list(range(N_CELLS))
    rng.shuffle(order)
    clues = N_CELLS
    blanks: list[int] = []  # the cells blanked so far (the search's empties, kept across removals)
    for i in order:
        if clues <= target:
            break
        d = cells[i]
        bit = 1 << d
        r, c, b = ROW[i], COL[i], BOX[i]
        rows[r] &= ~bit
        cols[c] &= ~bit
        boxes[b] &= ~bit
        cells[i] = 0
        others = ALL & ~(rows[r] | cols[c] | boxes[b]) & ~bit
        unique = True
        for other in _DIGITS[others]:  # another digit at i must lead nowhere
            obit = 1 << other
            cells[i] = other
            rows[r] |= obit
            cols[c] |= obit
            boxes[b] |= obit
            solvable = _search(cells, rows, cols, boxes, blanks, 1, None, [])
            rows[r] &= ~obit
            cols[c] &= ~obit
            boxes[b] &= ~obit
            cells[i] = 0
            if solvable:
                unique = False
                break
        if unique:
            clues -= 1
            blanks.append(i)
        else:
            cells[i] = d
            rows[r] |= bit
            cols[c] |= bit
            boxes[b] |= bit
    return cells


@dataclass(frozen=True)
class Puzzle:
    """A puzzle (81 digits, 0 = blank) and its solution (81 digits 1-9)."""

    quiz: str
    solution: str

    @property
    def num_clues(self) -> int:
        return N_CELLS - self.quiz.count("0")


def make_puzzle(seed: int, index: int, min_clues: int, max_clues: int, max_tries: int = 100) -> Puzzle:
    """Puzzle ``index`` of seed ``seed``: unique solution and ``min_clues <= clues <= max_clues``."""
    if not 17 <= min_clues <= max_clues <= N_CELLS:
        raise DataError(f"--min-clues/--max-clues must satisfy 17 <= min <= max <= 81, got "
                        f"{min_clues}/{max_clues}")
    rng = puzzle_rng(seed, index)
    for _ in range(max_tries):
        solution = to_cells(random_grid(rng))
        target = rng.randint(min_clues, max_clues)
        quiz = _remove_clues(solution, target, rng)
        if N_CELLS - quiz.count(0) <= max_clues:
            return Puzzle(to_string(quiz), to_string(solution))
    raise DataError(f"no puzzle with at most {max_clues} clues after {max_tries} grids; raise --max-clues "
                    "(random removal rarely goes below ~24 clues)")


def iter_puzzles(seed: int, start: int, stop: int, min_clues: int, max_clues: int) -> Iterator[Puzzle]:
    """Puzzles ``start .. stop-1`` of seed ``seed``."""
    for index in range(start, stop):
        yield make_puzzle(seed, index, min_clues, max_clues)


def check_pair(quiz: str, solution: str, where: str) -> Puzzle:
    """A :class:`Puzzle` from two strings, or :class:`DataError` naming ``where`` and what is wrong."""
    quiz, solution = quiz.strip().replace(".", "0"), solution.strip()
    for name, grid in (("quiz", quiz), ("solution", solution)):
        if len(grid) != N_CELLS or not grid.isdigit():
            raise DataError(f"{where}: {name} must be {N_CELLS} digits (0 = blank), got {len(grid)} characters "
                            f"{grid[:20]!r}...")
    if not is_valid_solution(solution):
        raise DataError(f"{where}: the solution is not a valid Sudoku grid (a digit repeats in a row, column "
                        "or box, or a cell is 0)")
    if not consistent(quiz, solution):
        raise DataError(f"{where}: the solution contradicts a clue of the quiz")
    return Puzzle(quiz, solution)


def read_csv(path: str, limit: int | None = None) -> Iterator[Puzzle]:
    """Puzzles of a ``quizzes,solutions`` CSV (header required; extra columns ignored), validated."""
    try:
        handle = open(path, newline="", encoding="utf-8")
    except OSError as err:
        raise DataError(f"--input {path}: cannot open ({err.strerror})") from None
    with handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            raise DataError(f"{path}: empty file; expected a header 'quizzes,solutions'")
        names = [h.strip().lower() for h in header]
        if "quizzes" not in names or "solutions" not in names:
            raise DataError(f"{path}:1: header {header} lacks the columns 'quizzes' and 'solutions'")
        qi, si = names.index("quizzes"), names.index("solutions")
        count = 0
        for line_no, row in enumerate(reader, start=2):
            if not row or all(not cell.strip() for cell in row):
                continue
            if len(row) <= max(qi, si):
                raise DataError(f"{path}:{line_no}: expected columns quizzes,solutions, got {len(row)} fields")
            yield check_pair(row[qi], row[si], f"{path}:{line_no}")
            count += 1
            if limit is not None and count >= limit:
                return


def write_csv(path: str, puzzles: list[Puzzle]) -> None:
    """Write ``puzzles`` as a ``quizzes,solutions`` CSV (atomically: temp file + rename)."""
    import os

    with open(path + ".tmp", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["quizzes", "solutions"])
        for p in puzzles:
            writer.writerow([p.quiz, p.solution])
    os.replace(path + ".tmp", path)


def encode_pair(puzzle: Puzzle) -> tuple[np.ndarray, np.ndarray]:
    """``(input_ids, prompt)``: int32 ``[164]`` = puzzle digits, SEP, solution digits, END, and the bool
    ``[164]`` prompt mask (True on the puzzle and the separator)."""
    ids = np.empty(SEQ_LEN, dtype=np.int32)
    ids[:N_CELLS] = np.frombuffer(puzzle.quiz.encode(), dtype=np.uint8) - 48
    ids[N_CELLS] = SEP_ID
    ids[PROMPT_LEN:PROMPT_LEN + N_CELLS] = np.frombuffer(puzzle.solution.encode(), dtype=np.uint8) - 48
    ids[-1] = END_ID
    prompt = np.zeros(SEQ_LEN, dtype=bool)
    prompt[:PROMPT_LEN] = True
    return ids, prompt


def decode_solution(ids: np.ndarray) -> str:
    """The solution part of a generated ``[164]`` sequence as 81 characters (a non-digit becomes ``"x"``)."""
    part = ids[PROMPT_LEN:PROMPT_LEN + N_CELLS]
    return "".join(chr(48 + int(v)) if 1 <= int(v) <= 9 else "x" for v in part)

