"""Sudoku solve-rate evaluation: metrics with standard errors, and solving puzzles with any sampler.

A model solves a puzzle by sampling the 164-token sequence with the puzzle and separator clamped as
the prompt (``Sampler.sample(..., prompt_mask_BL=...)``); the solution part of the output is graded.
Per puzzle (``grade``):

* ``exact``: every solution cell equals the stored solution;
* ``solved``: ``exact``, or the output is a valid grid (every digit once per row, column and box) that
  keeps every clue: an alternative solution, which counts as solved when a puzzle is not unique;
* ``valid_grid``: the output is a valid complete grid (clues not checked; with the prompt clamped
  the clues are kept anyway, so it differs from ``solved`` only for a model that breaks a clue);
* ``cell_accuracy``: the fraction of the puzzle's blank cells filled with the stored solution's digit.

Aggregates (``summarize``) are means over puzzles; a rate ``p`` over ``n`` puzzles has standard error
``sqrt(p (1 - p) / n)``, ``cell_accuracy`` (a per-puzzle mean, so every puzzle weighs the same) has
``std / sqrt(n)`` (sample std, ``n - 1`` in the denominator).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from udmtrain.data import sudoku as S

METRICS = ("solved", "exact", "valid_grid", "cell_accuracy")


def grade(quiz: str, solution: str, output: str) -> dict[str, float]:
    """The per-puzzle metrics of ``output`` (81 characters; a non-digit cell is wrong) for ``quiz``."""
    exact = output == solution
    valid = S.is_valid_solution(output)
    blanks = [i for i, ch in enumerate(quiz) if ch == "0"]
    right = sum(output[i] == solution[i] for i in blanks)
    return {"exact": float(exact), "solved": float(exact or (valid and S.consistent(quiz, output))),
            "valid_grid": float(valid), "cell_accuracy": right / len(blanks) if blanks else 1.0}


def summarize(graded: Sequence[dict[str, float]]) -> dict[str, Any]:
    """Means and standard errors of the per-puzzle metrics (see the module docstring)."""
    n = len(graded)
    if n == 0:
        raise ValueError("no puzzle was graded")
    out: dict[str, Any] = {"num_puzzles": n}
    for key in METRICS:
        values = np.array([g[key] for g in graded], dtype=np.float64)
        mean = float(values.mean())
        if key == "cell_accuracy":
            stderr = float(values.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
        else:
            stderr = math.sqrt(mean * (1.0 - mean) / n)
        out[key], out[f"{key}_stderr"] = mean, stderr
    return out


def prompt_batch(puzzles: Sequence[S.Puzzle], device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``(tokens_BL, prompt_BL)`` for the sampler: the puzzle + SEP as prompt (the rest of ``tokens_BL``
    is never read), ``[B, 164]`` long and bool."""
    pairs = [S.encode_pair(p) for p in puzzles]
    tokens = torch.from_numpy(np.stack([ids for ids, _ in pairs])).long()
    prompt = torch.from_numpy(np.stack([m for _, m in pairs]))
    tokens = torch.where(prompt, tokens, torch.zeros_like(tokens))  # the answer never reaches the sampler
    return tokens.to(device), prompt.to(device)


@torch.no_grad()
def solve(sampler: Any, network: Callable, puzzles: Sequence[S.Puzzle], batch_size: int, seed: int,
          device: torch.device | str = "cpu", progress: bool = False) -> tuple[list[str], list[int]]:
    """Solutions (81 characters each) drawn by ``sampler`` for ``puzzles`` and the NFE of each batch.

    Batch ``i`` uses a generator seeded with ``udmtrain.utils.seed.batch_seed(seed, i)`` on ``device``."""
    from udmtrain.utils.seed import batch_seed

    outputs: list[str] = []
    nfes: list[int] = []
    t0 = last = time.perf_counter()
    for i, start in enumerate(range(0, len(puzzles), batch_size)):
        chunk = puzzles[start:start + batch_size]
        tokens, prompt = prompt_batch(chunk, device)
        generator = torch.Generator(device=device).manual_seed(batch_seed(seed, i))
        out = sampler.sample(network, len(chunk), S.SEQ_LEN, generator, tokens, prompt_mask_BL=prompt)
        outputs.extend(S.decode_solution(row) for row in out.tokens_BL.cpu().numpy())
        nfes.append(int(out.nfe))
        now = time.perf_counter()
        if progress and (now - last > 5.0 or len(outputs) == len(puzzles)):
            last, rate = now, len(outputs) / max(now - t0, 1e-9)
            print(f"sudoku: solved {len(outputs)}/{len(puzzles)} puzzles, {rate:.1f}/s, "
                  f"ETA {(len(puzzles) - len(outputs)) / rate:.0f}s", flush=True, file=sys.stderr)
    return outputs, nfes


def evaluate(sampler: Any, network: Callable, puzzles: Sequence[S.Puzzle], batch_size: int, seed: int,
             device: torch.device | str = "cpu", progress: bool = False) -> dict[str, Any]:
    """``summarize`` of the graded outputs, plus the NFE and a few examples."""
    outputs, nfes = solve(sampler, network, puzzles, batch_size, seed, device, progress)
    graded = [grade(p.quiz, p.solution, o) for p, o in zip(puzzles, outputs)]
    report = summarize(graded)
    report["nfe"] = max(nfes)
    report["examples"] = [{"quiz": p.quiz, "solution": p.solution, "output": o, **g}
                          for p, o, g in list(zip(puzzles, outputs, graded))[:3]]
    return report


def puzzles_from_shards(spec: Any, split: str = "valid", limit: int | None = None) -> Iterator[S.Puzzle]:
    """The puzzles stored in Sudoku shards (``tools/prepare_data.py --source sudoku|csv``), in order."""
    from udmtrain.data.errors import DataError
    from udmtrain.data.shards import CorruptSample, decode_sample, resolve_shards
    from udmtrain.data.webdataset import iter_raw_samples

    def fail(err: Exception) -> bool:
        raise DataError(f"unreadable Sudoku shard in {spec!r}: {err}")

    count = 0
    for url in resolve_shards(spec, split):
        for raw in iter_raw_samples(url, fail):
            try:
                ids, _ = decode_sample(raw, S.SEQ_LEN)
            except CorruptSample as err:
                raise DataError(f"{url}: {err}; these are not Sudoku shards (164 tokens per sample)") from None
            quiz = "".join(chr(48 + int(v)) for v in ids[:S.N_CELLS])
            yield S.check_pair(quiz, S.decode_solution(ids), f"{url} sample {raw.get('__key__')}")
            count += 1
            if limit is not None and count >= limit:
                return


def load_puzzles(source: str, split: str = "valid", limit: int | None = None) -> list[S.Puzzle]:
    """Puzzles of a ``quizzes,solutions`` CSV file or of a Sudoku shard directory / pattern."""
    if source.endswith(".csv"):
        return list(S.read_csv(source, limit))
    return list(puzzles_from_shards(source, split, limit))


def parse_sampler_spec(spec: str) -> tuple[str, list[str]]:
    """``"pc_gibbs:k_parallel=4:corrector_steps=1"`` -> (label, ``sampler.*`` overrides).

    ``greedy`` is the recipe's sampler at temperature 1e-4 on the logits (argmax decoding up to ties);
    ``NAME:greedy`` the same for sampler NAME."""
    parts = [p for p in spec.split(":") if p]
    if not parts:
        raise ValueError("empty sampler setting in --sweep")
    overrides: list[str] = []
    name, rest = parts[0], parts[1:]
    if name != "greedy":
        overrides.append(f"sampler.name={name}")
    elif rest:
        raise ValueError(f"sampler setting {spec!r}: write NAME:greedy to decode NAME greedily")
    for item in (rest if name != "greedy" else ["greedy"]):
        if item == "greedy":
            overrides += ["sampler.temperature=0.0001", "sampler.temperature_on=logits"]
        elif "=" in item:
            overrides.append(f"sampler.{item}")
        else:
            raise ValueError(f"sampler setting {spec!r}: {item!r} is not KEY=VALUE or 'greedy'")
    return spec, overrides


def sweep_grid(items: Iterable[str]) -> list[dict[str, Any]]:
    """``["steps=4,8", "sampler=ancestral,confidence"]`` -> settings ``{"sampler", "steps"}`` (all pairs)."""
    values: dict[str, list[str]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or key not in ("steps", "sampler") or not raw:
            raise ValueError(f"--sweep {item!r}: expected steps=N1,N2,... or sampler=NAME1,NAME2[:key=value],...")
        values[key] = [v for v in raw.split(",") if v]
    if "steps" not in values:
        raise ValueError("--sweep needs steps=N1,N2,...")
    try:
        steps = [int(v) for v in values["steps"]]
    except ValueError:
        raise ValueError(f"--sweep steps={','.join(values['steps'])}: steps must be integers") from None
    return [{"sampler": s, "steps": n} for s in values.get("sampler", ["recipe"]) for n in steps]


def plot_solve_rate(rows: Sequence[dict[str, Any]], png_path: str, metric: str = "solved") -> None:
    """PNG of ``metric`` (with +-1 standard error bars) against steps, one line per sampler setting."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    lines: dict[str, list[tuple[float, float, float]]] = {}
    for r in rows:
        lines.setdefault(str(r["sampler"]), []).append(
            (float(r["steps"]), float(r[metric]), float(r.get(f"{metric}_stderr") or 0.0)))
    fig, ax = plt.subplots(figsize=(7, 5))
    for name, pts in sorted(lines.items()):
        pts.sort()
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o",
                    capsize=3, label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sampling steps (network evaluations)")
    ax.set_ylabel(f"{metric} fraction")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"Sudoku: {metric} vs steps")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
