"""Generative perplexity (+ entropy, MAUVE when available) of a checkpoint's samples under a judge LM.

    python tools/gen_ppl.py --ckpt runs/quickstart-audm --num-samples 64 --steps 64 --judge runs/quickstart-ar
    python tools/gen_ppl.py --ckpt runs/owt-udlm --num-samples 256 --steps 256 --temperature 0.9 \\
        --judge gpt2-large --judge-batch-size 16 --out genppl.json          # hub id (needs network)
    python tools/gen_ppl.py --ckpt runs/owt-udlm --num-samples 256 --steps 128 --judge /models/gpt2-large
    python tools/gen_ppl.py --ckpt runs/quickstart-audm --num-samples 32 --judge runs/quickstart-ar \\
        --sweep temperature=0.8,0.9,1.0 top_p=0.9,1.0 steps=16,64 --out-dir frontier/

``--judge``: a udmtrain AR run or step directory (offline: the AR run's tokenizer, BOS prepended), a
local Hugging Face directory, or a hub id (default gpt2-large, needs network; offline the tool stops
at once and names the judge to pass, e.g. ``--judge runs/quickstart-ar``). Sampler options as in
tools/sample.py (flags or ``sampler.*`` overrides). ``--sweep`` writes ``frontier.csv`` (one row per
setting), ``frontier.png`` (gen PPL vs entropy per step count) and every setting's full report under
``reports/`` (``steps16_T0.9_p1_<context_id>.json``). A rerun reuses the rows computed with the same
settings and recomputes the others: the key is the swept values plus ``context_id``, a hash of
everything else that changes a result (``--num-samples``, ``--seed``, ``--batch-size``, the other
sampler options, checkpoint, EMA, judge, ``--prefix-eos``, MAUVE references); it says what it reused.

Report fields: ``gen_ppl`` = exp(mean judge NLL per counted token), ``entropy`` = mean per-sample
unigram entropy (nats), ``num_truncated`` = samples longer than the judge's context (cut to it), the
protocol (retokenization, first-EOS token accounting), the sampler settings and seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from udmtrain.train import inference as inf  # noqa: E402
from udmtrain.utils.argtypes import device_name, positive_int  # noqa: E402
from udmtrain.utils.io import check_writable, write_text_atomic  # noqa: E402
from udmtrain.utils.progress import counting, progress  # noqa: E402

SWEEP_KEYS = {"temperature": float, "top_p": float, "steps": int}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="run dir, its checkpoints/ dir, a step_XXXXXXXXXX dir, or an export "
                                                 "of tools/export_ckpt.py")
    p.add_argument("--num-samples", type=positive_int, default=64)
    inf.add_sampler_arguments(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=positive_int, default=None, help="samples per sampler call (default: all)")
    p.add_argument("--judge", default="gpt2-large", help="udmtrain AR run/step dir | HF dir | HF hub id")
    p.add_argument("--judge-batch-size", type=positive_int, default=8)
    p.add_argument("--judge-dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="Hugging Face judges (a udmtrain AR judge runs in its recipe's precision)")
    p.add_argument("--judge-no-ema", action="store_true",
                   help="a udmtrain AR judge: its raw weights instead of the EMA (needed if it trained without EMA)")
    p.add_argument("--prefix-eos", action="store_true", help="prefix the judge's EOS to every sample")
    p.add_argument("--mauve-references", default=None, help="text file, one reference text per line")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--device", type=device_name, default=None, help="cpu | cuda[:i] (default: cuda when available)")
    p.add_argument("--out", default=None, help="JSON report (single run)")
    p.add_argument("--sweep", nargs="+", default=None, metavar="KEY=V1,V2",
                   help=f"grid over {', '.join(SWEEP_KEYS)}; needs --out-dir")
    p.add_argument("--out-dir", default=None, help="sweep output directory (frontier.csv / .png, reports/)")
    return p


def parse_sweep(items: list[str], loaded: inf.Loaded, overrides: list[str] = ()) -> list[dict]:
    """``["temperature=0.8,1.0", ...]`` -> the grid; unswept keys keep the (flag-adjusted) recipe value."""
    from udmtrain.eval.frontier import grid

    s = loaded.cfg.sampler.cfg
    values = {"temperature": [s.temperature], "top_p": [s.top_p], "steps": [s.num_steps]}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or key not in SWEEP_KEYS or not raw:
            raise inf.InferenceError(f"--sweep {item!r}: expected KEY=V1,V2,... with KEY one of {sorted(SWEEP_KEYS)}")
        try:
            values[key] = [SWEEP_KEYS[key](v) for v in raw.split(",")]
        except ValueError:
            raise inf.InferenceError(f"--sweep {item!r}: values must be {SWEEP_KEYS[key].__name__}s") from None
    settings = grid(values["temperature"], values["top_p"], values["steps"])
    seen: dict = {}
    for setting in settings:  # 1 and 1.0 are one setting: a grid holding it twice is a typo, caught now
        key = tuple(float(setting[k]) for k in ("steps", "temperature", "top_p"))
        if key in seen:
            raise inf.InferenceError(f"--sweep lists the setting {setting} twice (e.g. 1 and 1.0); remove the "
                                     "repeated value")
        seen[key] = setting
    for setting in settings:  # every setting built once now (a bad value fails before any sampling)
        inf.with_sampler(loaded, [*overrides, *setting_overrides(setting)])
    return settings


def setting_overrides(setting: dict) -> list[str]:
    """The sampler overrides of one sweep setting on top of the run's (flags and dotted overrides)."""
    return [f"sampler.num_steps={setting['steps']}", f"sampler.temperature={setting['temperature']}",
            f"sampler.top_p={setting['top_p']}"]


def score(loaded: inf.Loaded, judge, args, references) -> dict:
    """Draw ``--num-samples`` samples and return their gen_ppl_report."""
    from udmtrain.eval.gen_ppl import gen_ppl_report

    batch_size = args.batch_size or args.num_samples
    with inf.sampling_progress(loaded, args.num_samples, batch_size) as bar:
        drawn = inf.draw_samples(loaded, args.num_samples, batch_size, args.seed,
                                 network=counting(loaded.network(), bar.update))
    with progress(args.num_samples, "judging", unit="sample") as bar:
        return gen_ppl_report(
            drawn["tokens"], lambda ids: [loaded.tokenizer.decode(x) for x in ids], judge,
            batch_size=args.judge_batch_size, prefix_eos=args.prefix_eos,
            sampler_settings=inf.sampler_settings(loaded), seeds={"base_seed": args.seed, "batch_seeds": drawn["seeds"]},
            mauve_references=references, on_progress=bar.update,
            protocol={"model": loaded.protocol(), "nfe_per_batch": drawn["nfe"], "batch_sizes": drawn["batch_sizes"]})


def sweep_context(loaded: inf.Loaded, judge, args, references: list[str] | None = None) -> dict:
    """Everything besides the swept values that changes a sweep row (its resume key, hashed)."""
    import hashlib

    swept = {"num_steps", "temperature", "top_p"}
    judge_id = dict(judge.identity())
    name = str(judge_id.get("name_or_path", args.judge))
    judge_id["name_or_path"] = os.path.abspath(name) if os.path.exists(name) else name  # a path or a hub id
    # the MAUVE references' content, not their path: an edited file must not reuse rows
    references_sha256 = hashlib.sha256("\n".join(references).encode()).hexdigest() if references else None
    recipe = {k: v for k, v in loaded.cfg.to_dict().items() if k != "sampler"}  # e.g. a data.seq_len override
    return {"checkpoint": os.path.abspath(loaded.step_dir), "step": loaded.step, "ema": loaded.use_ema,
            "num_samples": args.num_samples, "seed": args.seed, "batch_size": args.batch_size or args.num_samples,
            "device": str(loaded.device), "recipe": recipe,
            "sampler": {k: v for k, v in inf.sampler_settings(loaded).items() if k not in swept},
            "judge": judge_id, "judge_dtype": args.judge_dtype,
            "prefix_eos": args.prefix_eos, "mauve_references": references_sha256}


def report_name(setting: dict, cid: str) -> str:
    """``steps16_T0.9_p1_<context_id>.json``: numbers as written by a person, not ``16.0``."""
    return f"steps{int(setting['steps'])}_T{float(setting['temperature']):g}_p{float(setting['top_p']):g}_{cid}.json"


def main(argv: list[str] | None = None) -> int:
    from udmtrain.eval.frontier import context_id, run_sweep

    args, unknown = build_parser().parse_known_args(argv)
    overrides = inf.sampler_overrides(args, inf.split_overrides(unknown))
    if args.sweep and not args.out_dir:
        raise inf.InferenceError("--sweep needs --out-dir (where frontier.csv and frontier.png go)")
    if args.out:
        check_writable(args.out, "--out")
    if args.out_dir:
        check_writable(args.out_dir, "--out-dir", directory=True)
    inf.require_diffusion_run(args.ckpt, "tools/gen_ppl.py")
    device = args.device or ("cuda" if __import__("torch").cuda.is_available() else "cpu")
    loaded = inf.load_for_inference(args.ckpt, overrides, use_ema=not args.no_ema, device=device)
    settings = parse_sweep(args.sweep, loaded, overrides) if args.sweep else None  # checked before the judge loads
    judge = inf.judge_from_spec(args.judge, device=device, use_ema=not args.judge_no_ema, dtype=args.judge_dtype)
    references = None
    if args.mauve_references:
        with open(args.mauve_references, encoding="utf-8") as f:
            references = [line.rstrip("\n") for line in f if line.strip()]
    if not args.sweep:
        report = score(loaded, judge, args, references)
        text = json.dumps(report, indent=2)
        print(text)
        if args.out:
            write_text_atomic(args.out, text + "\n")
        print(f"udmtrain: gen_ppl {report['gen_ppl']:.2f} | entropy {report['entropy']:.3f} | "
              f"{report['num_samples']} samples", file=sys.stderr)
        return 0
    os.makedirs(os.path.join(args.out_dir, "reports"), exist_ok=True)
    context = sweep_context(loaded, judge, args, references)

    def generate_and_score(setting: dict) -> dict:
        here = inf.with_sampler(loaded, overrides + setting_overrides(setting))
        report = score(here, judge, args, references)
        write_text_atomic(os.path.join(args.out_dir, "reports", report_name(setting, context_id(context))),
                          json.dumps(report, indent=2) + "\n")
        print(f"udmtrain: {setting} -> gen_ppl {report['gen_ppl']:.2f} entropy {report['entropy']:.3f}",
              file=sys.stderr)
        return {"gen_ppl": report["gen_ppl"], "gen_nll": report["gen_nll"], "entropy": report["entropy"],
                "entropy_std": report["entropy_std"], "num_samples": report["num_samples"],
                "nfe": max(report["nfe_per_batch"]), "sampler": here.cfg.sampler.name, "seed": args.seed,
                "judge": report["judge"]["name_or_path"], "mauve": report["mauve"].get("mauve", "")}

    with progress(len(settings), "sweep", unit="setting") as bar:
        rows = run_sweep(settings, generate_and_score, os.path.join(args.out_dir, "frontier.csv"),
                         plot_path=os.path.join(args.out_dir, "frontier.png"), context=context,
                         on_progress=bar.update)
    print(json.dumps({"csv": os.path.join(args.out_dir, "frontier.csv"), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(inf.run_cli(main, sys.argv[1:]))
