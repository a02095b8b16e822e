"""Sudoku puzzle sets: many puzzles in worker processes (with progress), and the train/valid split.

Built on :mod:`udmtrain.data.sudoku` (one puzzle per ``(seed, index)``), so the set does not depend on
the number of workers.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator

from udmtrain.data.sudoku import Puzzle, iter_puzzles


def _chunk(args: tuple[int, int, int, int, int]) -> list[Puzzle]:
    seed, start, stop, lo, hi = args
    return list(iter_puzzles(seed, start, stop, lo, hi))


def generate(seed: int, start: int, stop: int, min_clues: int, max_clues: int, num_workers: int = 0,
             progress: bool = False, chunk: int = 500) -> Iterator[Puzzle]:
    """Puzzles ``start .. stop-1`` of ``seed`` in index order, made by ``num_workers`` processes (0: here);
    with ``progress`` a line with the rate and ETA goes to stderr every few seconds."""
    pieces = [(seed, a, min(a + chunk, stop), min_clues, max_clues) for a in range(start, stop, chunk)]
    if num_workers > 0 and len(pieces) > 1:
        from multiprocessing import get_context

        pool = get_context("fork" if sys.platform.startswith("linux") else "spawn").Pool(num_workers)
        results: Iterator[list[Puzzle]] = pool.imap(_chunk, pieces)
    else:
        pool, results = None, map(_chunk, pieces)
    t0 = last = time.perf_counter()
    done, total = 0, stop - start
    try:
        for batch in results:
            yield from batch
            done += len(batch)
            now = time.perf_counter()
            if progress and (now - last > 5.0 or done == total):
                last, rate = now, done / max(now - t0, 1e-9)
                print(f"sudoku: {done}/{total} puzzles, {rate:.0f}/s, ETA {(total - done) / rate:.0f}s",
                      file=sys.stderr, flush=True)
    finally:
        if pool is not None:
            pool.terminate()


def split_puzzles(puzzles: Iterator[Puzzle], num_valid: int) -> tuple[list[Puzzle], list[Puzzle], int]:
    """``(train, valid, dropped)``: the first ``num_valid`` distinct puzzles are the validation split; a
    later puzzle whose quiz is already in the validation split is dropped (counted), so the two
    splits share no puzzle."""
    valid: list[Puzzle] = []
    seen: set[str] = set()
    train: list[Puzzle] = []
    dropped = 0
    for p in puzzles:
        if len(valid) < num_valid:
            if p.quiz in seen:
                dropped += 1
                continue
            seen.add(p.quiz)
            valid.append(p)
        elif p.quiz in seen:
            dropped += 1
        else:
            train.append(p)
    return train, valid, dropped
