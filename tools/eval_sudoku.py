"""Sudoku solve rate of a trained checkpoint: solved / exact / valid-grid fractions and blank-cell accuracy,
each with its standard error (docs/sudoku.md).

    python tools/eval_sudoku.py --ckpt runs/sudoku-quick --steps 16 --out runs/sudoku-quick/sudoku.json
    python tools/eval_sudoku.py --ckpt runs/sudoku-audm --data data/sudoku --num-puzzles 1000 --steps 16 \\
        --sampler pc_gibbs sampler.k_parallel=4 --seed 1 --out audm-pc.json
    python tools/eval_sudoku.py --ckpt runs/sudoku-quick --num-puzzles 200 \\
        --sweep steps=4,8,16,32 sampler=ancestral,confidence,greedy --out sweep.json

Puzzles: the validation split of ``--data`` (a Sudoku shard directory or pattern from
tools/prepare_data.py --source sudoku|csv, default: the recipe's data.valid_shards) or a
``quizzes,solutions`` CSV file. The puzzle and separator are clamped as the prompt; the sampler fills
the solution. Sampler options as in tools/sample.py (flags or dotted ``sampler.*`` overrides).
``--sweep`` runs every (sampler, steps) pair and writes OUT.csv (one row per setting, resumable) and
OUT.png (solved fraction vs steps, one line per sampler). A rerun reuses the rows computed with the
same settings and recomputes the others: the key is (sampler, steps) plus ``context_id``, a hash of
everything else that changes a row (checkpoint and step, EMA, the puzzles themselves -- ``--data``,
``--split``, ``--num-puzzles`` and so the clue range --, ``--seed``, ``--batch-size``, the other sampler
options); it says what it reused. A
sampler setting is ``NAME`` or ``NAME:key=value:...``; ``greedy`` is the recipe's sampler at
temperature 1e-4 on the logits (argmax decoding), ``NAME:greedy`` the same for NAME; ``confidence`` is
greedy by construction.

An autoregressive run (``recipes/sudoku_ar.yaml``) reads the puzzle and decodes the solution left to
right, one network call per cell: greedy by default, ``--temperature T [--top-p P]`` to draw; the
diffusion sampler options and ``--sweep`` do not apply to it.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from udmtrain.train import inference as inf  # noqa: E402
from udmtrain.utils.io import check_writable, write_text_atomic  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="run dir, its checkpoints/ dir, or a step_XXXXXXXXXX dir")
    p.add_argument("--data", default=None, help="Sudoku shard dir/pattern or a quizzes,solutions CSV "
                                                "(default: the recipe's data.valid_shards)")
    p.add_argument("--split", default="valid", choices=["train", "valid"], help="shard split to read")
    p.add_argument("--num-puzzles", type=int, default=1000, help="first N puzzles of the split")
    inf.add_sampler_arguments(p)
    p.add_argument("--seed", type=int, default=0, help="batch i samples with seed + i")
    p.add_argument("--batch-size", type=int, default=100, help="puzzles per sampler call")
    p.add_argument("--ema", choices=["auto", "yes", "no"], default="auto",
                   help="weights: the EMA if the run kept one (auto), always, or the raw weights")
    p.add_argument("--device", default=None, help="cpu | cuda[:i] (default: cuda when available)")
    p.add_argument("--sweep", nargs="+", default=None, metavar="KEY=V1,V2",
                   help="steps=4,8,16,32 [sampler=ancestral,pc_gibbs,confidence,greedy,...]")
    p.add_argument("--out", required=True, help="JSON report; with --sweep also OUT.csv and OUT.png")
    return p


def _ar_decoder(args: argparse.Namespace, unknown: list[str]):
    """The left-to-right decoder for an AR run; refuses the options that only diffusion samplers take."""
    from udmtrain.eval.ar_decode import ARPromptDecoder

    given = [flag for flag, value in (("--sampler", args.sampler), ("--steps", args.steps),
                                      ("--temperature-on", args.temperature_on), ("--sweep", args.sweep)) if value]
    given += list(unknown)
    if given:
        raise inf.InferenceError(f"{args.ckpt} is an autoregressive run: it decodes the solution left to right, "
                                 f"one network call per cell, so {', '.join(given)} do not apply; it takes "
                                 "--temperature (0 = greedy, the default) and --top-p")
    try:
        return ARPromptDecoder(temperature=0.0 if args.temperature is None else args.temperature,
                               top_p=1.0 if args.top_p is None else args.top_p)
    except ValueError as err:
        raise inf.InferenceError(str(err)) from None


def _load(args: argparse.Namespace, overrides: list[str]) -> inf.Loaded:
    from udmtrain.train.inference import load_ema_shadow, resolve_checkpoint

    use_ema = {"yes": True, "no": False}.get(args.ema)
    if use_ema is None:
        use_ema = load_ema_shadow(resolve_checkpoint(args.ckpt)) is not None
    device = args.device or ("cuda" if __import__("torch").cuda.is_available() else "cpu")
    loaded = inf.load_for_inference(args.ckpt, overrides, use_ema=use_ema, device=device)
    if loaded.tokenizer.name != "sudoku" or int(loaded.cfg.data.seq_len) != 164:
        raise inf.InferenceError(f"{loaded.step_dir} was not trained on Sudoku (tokenizer "
                                 f"{loaded.tokenizer.name!r}, seq_len {loaded.cfg.data.seq_len}); train a "
                                 "recipes/sudoku_*.yaml recipe")
    return loaded


def check_outputs(out: str, sweep: bool) -> str:
    """Fail before the work on an ``--out`` that cannot be written (with ``--sweep`` also OUT.csv and
    OUT.png) or a sweep CSV without ``context_id`` (an older eval_sudoku's, whose rows cannot be told
    apart); returns the stem of the sweep files."""
    from udmtrain.eval.frontier import CONTEXT_FIELD

    stem = out[:-5] if out.endswith(".json") else out
    for path in [out] + ([stem + ".csv", stem + ".png"] if sweep else []):
        check_writable(path, "--out")
    if sweep and os.path.isfile(stem + ".csv"):
        with open(stem + ".csv", newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), None)
        if header and CONTEXT_FIELD not in header:
            raise inf.InferenceError(f"--out {out}: {stem}.csv has no {CONTEXT_FIELD} column (an older eval_sudoku's "
                                     "sweep), so its rows cannot be matched to their checkpoint and puzzles; move it "
                                     "away or choose another --out")
    return stem


def sweep_context(loaded: inf.Loaded, args: argparse.Namespace, source: str, puzzles: list,
                  overrides: list[str]) -> dict:
    """Everything besides the swept (sampler, steps) that changes a sweep row (its resume key, hashed): the
    weights, the puzzles (named and hashed: a regenerated data set at the same path differs) and the
    sampling settings."""
    digest = hashlib.sha256("\n".join(f"{p.quiz},{p.solution}" for p in puzzles).encode()).hexdigest()[:16]
    return {"checkpoint": os.path.abspath(loaded.step_dir), "step": loaded.step, "ema": loaded.use_ema,
            "data": os.path.abspath(source), "split": args.split, "num_puzzles": len(puzzles),
            "puzzles_sha256": digest, "seed": args.seed, "batch_size": args.batch_size,
            "device": str(loaded.device),  # CUDA and CPU generators draw different numbers from one seed
            "sampler": {k: v for k, v in inf.sampler_settings(loaded).items() if k != "num_steps"},
            "overrides": [o for o in overrides if not o.startswith("sampler.num_steps=")]}


def main(argv: list[str] | None = None) -> int:
    from udmtrain.data.errors import DataError
    from udmtrain.eval import sudoku as ev

    args, unknown = build_parser().parse_known_args(argv)
    dotted = inf.split_overrides(unknown)
    decoder = _ar_decoder(args, dotted) if inf.is_autoregressive_run(args.ckpt) else None
    overrides = [] if decoder else inf.sampler_overrides(args, dotted)
    if args.num_puzzles < 1 or args.batch_size < 1:
        raise inf.InferenceError(f"--num-puzzles ({args.num_puzzles}) and --batch-size ({args.batch_size}) "
                                 "must be >= 1")
    try:
        settings = ev.sweep_grid(args.sweep) if args.sweep else None
        specs = {s["sampler"]: ev.parse_sampler_spec(s["sampler"])[1] if s["sampler"] != "recipe" else []
                 for s in settings or []}
    except ValueError as err:
        raise inf.InferenceError(str(err)) from None
    stem = check_outputs(args.out, bool(settings))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    loaded = _load(args, overrides)
    source = args.data or loaded.cfg.data.valid_shards
    if not source:
        raise DataError("the recipe has no data.valid_shards; pass --data DIR_OR_CSV")
    puzzles = ev.load_puzzles(str(source), args.split, args.num_puzzles)
    if not puzzles:
        raise DataError(f"no puzzle in {source} ({args.split} split)")
    network = loaded.network()
    base = {"checkpoint": loaded.protocol(), "data": str(source), "split": args.split,
            "num_puzzles": len(puzzles), "seed": args.seed, "batch_size": args.batch_size}

    def run(here: inf.Loaded) -> dict:
        sampler = decoder or here.components.sampler
        report = ev.evaluate(sampler, network, puzzles, args.batch_size, args.seed, loaded.device, progress=True)
        return {**base, "sampler": decoder.settings() if decoder else inf.sampler_settings(here), **report}

    if settings is None:
        report = run(loaded)
        text = json.dumps(report, indent=2)
        write_text_atomic(args.out, text + "\n")
        print(text)
        print(f"udmtrain: solved {report['solved']:.3f} +- {report['solved_stderr']:.3f} | exact "
              f"{report['exact']:.3f} | cell accuracy {report['cell_accuracy']:.3f} | {len(puzzles)} puzzles, "
              f"{report['nfe']} NFE -> {args.out}", file=sys.stderr)
        return 0
    from udmtrain.eval.frontier import context_id, run_sweep

    for spec in specs.values():  # every sampler setting must suit the run before the first one starts
        inf.with_sampler(loaded, overrides + spec)
    context = sweep_context(loaded, args, str(source), puzzles, overrides)
    reports: list[dict] = []

    def one(setting: dict) -> dict:
        here = inf.with_sampler(loaded, overrides + specs.get(setting["sampler"], [])
                                + [f"sampler.num_steps={setting['steps']}"])
        report = run(here)
        reports.append({**setting, **{k: v for k, v in report.items() if k != "examples"}})
        print(f"udmtrain: {setting} -> solved {report['solved']:.3f} +- {report['solved_stderr']:.3f}",
              file=sys.stderr)
        return {"sampler_name": here.cfg.sampler.name, "nfe": report["nfe"], "num_puzzles": len(puzzles),
                **{k: report[k] for m in ev.METRICS for k in (m, f"{m}_stderr")}}

    rows = run_sweep(settings, one, stem + ".csv", key_fields=("sampler", "steps"), context=context)
    ev.plot_solve_rate(rows, stem + ".png")
    write_text_atomic(args.out, json.dumps({**base, "context_id": context_id(context), "csv": stem + ".csv",
                                            "png": stem + ".png", "rows": rows, "reports": reports}, indent=2) + "\n")
    print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(inf.run_cli(main, sys.argv[1:]))
