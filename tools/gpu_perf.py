"""GPU performance sweep in one prepared run: training throughput / MFU of the small DiT at L = 1024 bf16
(AUDM and MDLM) over micro-batch, ``engine.compile``, fused AdamW and attention backend, and every
sampler's NFE/s at batch 64. Writes every JSON to ``--out`` and a Markdown table into ``--doc``
(between ``<!-- gpu_perf:begin -->`` and ``<!-- gpu_perf:end -->``, replaced on each run).

    bash tools/gpu_perf.sh                     # on the GPU machine (wheels from .whl/ as gpu_check.sh)
    python tools/gpu_perf.py --smoke           # CPU: tiny sizes, a reduced grid, checks the plumbing

Budget: the full grid is sized for ~8 minutes on one H200 (each row is a fresh process: DeepSpeed
start-up ~15 s, ``engine.compile`` adds its compile time). ``--budget-s`` stops starting new rows
once exceeded, so the table always gets written; rows that fail or time out are listed with their
error. Each row is ``tools/bench.py train`` / ``tools/bench.py sample`` with the overrides shown.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- gpu_perf:begin -->", "<!-- gpu_perf:end -->"


def grid(smoke: bool) -> tuple[list[tuple[str, str, list[str]]], list[tuple[str, str, list[str]]], dict]:
    """``(train_rows, sample_rows, sizes)``: each row ``(label, recipe, overrides)``."""
    if smoke:
        sizes = {"seq_len": 64, "vocab": 400, "model": ["model.hidden_size=64", "model.num_blocks=2",
                 "model.num_heads=2", "model.cond_dim=32"], "steps": 2, "warmup": 1, "sample_batch": 4,
                 "sample_steps": 4, "mb": [2], "device": "cpu"}
        train = [("audm mb2", "recipes/absorbing_udm.yaml", ["engine.micro_batch_size=2"]),
                 ("audm mb2 unfused", "recipes/absorbing_udm.yaml",
                  ["engine.micro_batch_size=2", "optim.fused=false"])]
        sample = [("audm", "recipes/absorbing_udm.yaml", ["--sampler", "ancestral,reaudm"])]
        return train, sample, sizes
    sizes = {"seq_len": 1024, "vocab": 8192, "model": [], "steps": 8, "warmup": 3, "sample_batch": 64,
             "sample_steps": 16, "device": "cuda"}
    audm, mdlm = "recipes/absorbing_udm.yaml", "recipes/mdlm.yaml"
    train = [(f"{name} mb{mb}", recipe, [f"engine.micro_batch_size={mb}"])
             for mb in (16, 32) for name, recipe in (("audm", audm), ("mdlm", mdlm))]
    train += [("audm mb64", audm, ["engine.micro_batch_size=64"]),
              ("audm mb32 unfused AdamW", audm, ["engine.micro_batch_size=32", "optim.fused=false"]),
              ("audm mb32 sdpa", audm, ["engine.micro_batch_size=32", "model.attn_backend=sdpa"]),
              ("audm mb32 compile", audm, ["engine.micro_batch_size=32", "engine.compile=true"])]
    sample = [("audm", audm, ["--sampler", "ancestral,reaudm,pc_gibbs"]),
              ("mdlm", mdlm, ["--sampler", "ancestral,remdm"]),
              ("udlm", "recipes/udlm_loo.yaml", ["--sampler", "ancestral,max_coupling,pc_gibbs"])]
    return train, sample, sizes


def _run(cmd: list[str], timeout: float, env: dict) -> tuple[int, str]:
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        return proc.returncode, (proc.stdout + proc.stderr)[-1500:]
    except subprocess.TimeoutExpired:
        return 124, f"timed out after {timeout:.0f}s"


def prepare_data(out: Path, sizes: dict, env: dict) -> list[str]:
    """Tokenizer + shards of the demo corpus at ``seq_len``; returns the data overrides."""
    data = out / "data"
    tok = data / "tok.model"
    if not (data / "manifest.json").is_file():
        # --force: a model left by an interrupted earlier run is retrained (train_tokenizer refuses to replace one)
        for cmd in (["tools/train_tokenizer.py", "--source", "demo", "--vocab-size", str(sizes["vocab"]), "--out", str(tok),
                     "--force"],
                    ["tools/prepare_data.py", "--source", "demo", "--tokenizer", str(tok), "--seq-len",
                     str(sizes["seq_len"]), "--no-progress", "--out", str(data)]):
            rc, text = _run([sys.executable, *cmd], 300, env)
            if rc != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed: {text}")
    return [f"data.train_shards={data}/train-*.tar", f"data.valid_shards={data}/valid-*.tar",
            f"data.seq_len={sizes['seq_len']}", "data.num_workers=2",
            f"tokenizer={{name: sentencepiece, path: {tok}}}"]


def install_wheels(target: str = "/tmp/site") -> str | None:
    """``pip install --no-index --no-deps --target`` of ``.whl/*.whl`` (the wheels carried to an offline
    device machine); returns ``target``, or None when there are no wheels."""
    wheels = sorted(str(p) for p in (REPO / ".whl").glob("*.whl"))
    if not wheels:
        return None
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--upgrade", "--target", target, *wheels], check=True)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny sizes, reduced grid")
    parser.add_argument("--out", default=os.environ.get("OUT", "gpu_perf_out"), help="JSON / log directory")
    parser.add_argument("--doc", default=None, help="Markdown file to update (default docs/perf.md; "
                        "with --smoke: <out>/perf_smoke.md)")
    parser.add_argument("--budget-s", type=float, default=480.0, help="start no new row after this (default 480)")
    parser.add_argument("--wheels", action="store_true",
                        help="pip-install .whl/*.whl to /tmp/site first and put it on PYTHONPATH (device machine)")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    doc = Path(args.doc) if args.doc else (out / "perf_smoke.md" if args.smoke else REPO / "docs" / "perf.md")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    site = install_wheels() if args.wheels else None
    env["PYTHONPATH"] = os.pathsep.join(p for p in (site, str(REPO), env.get("PYTHONPATH")) if p)
    env.setdefault("TORCH_EXTENSIONS_DIR", "/tmp/torch_ext")
    if args.smoke:
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "2"))
    t_start = time.perf_counter()
    train_rows, sample_rows, sizes = grid(args.smoke)
    data = prepare_data(out, sizes, env)
    common = [*data, *sizes["model"], "engine.precision=bf16", "engine.zero_stage=1", "eval.every=0"]
    results: list[tuple[str, str, str, dict | None, str]] = []  # kind, label, command, report, error
    # micro-batch rows, then the samplers, then the variants (compile last: the slowest to start), so a
    # spent budget skips the least important rows
    rows = ([("train", *r) for r in train_rows[:5]] + [("sample", *r) for r in sample_rows]
            + [("train", *r) for r in train_rows[5:]])
    for i, (kind, label, recipe, extra) in enumerate(rows):
        elapsed = time.perf_counter() - t_start
        if elapsed > args.budget_s:
            results.append((kind, label, "", None, f"skipped: budget {args.budget_s:.0f}s spent"))
            continue
        js = out / f"{kind}_{label.replace(' ', '_')}.json"
        if kind == "train":
            mb = next(int(o.split("=")[1]) for o in extra if o.startswith("engine.micro_batch_size="))
            cmd = ["tools/bench.py", "train", "--recipe", recipe, "--steps", str(sizes["steps"]), "--warmup",
                   str(sizes["warmup"]), "--out", str(js), *common, *extra, f"engine.global_batch_size={mb}"]
        else:
            cmd = ["tools/bench.py", "sample", "--recipe", recipe, "--batch-size", str(sizes["sample_batch"]),
                   "--steps", str(sizes["sample_steps"]), "--repeats", "2", "--warmup", "1", "--device",
                   sizes["device"], "--out", str(js), *extra, *common]
        rc, text = _run([sys.executable, *cmd], max(60.0, args.budget_s + 120 - elapsed), env)
        (out / f"{kind}_{label.replace(' ', '_')}.log").write_text(text)
        report = json.loads(js.read_text()) if rc == 0 and js.is_file() else None
        results.append((kind, label, "python " + " ".join(cmd[:1] + cmd[1:]), report, "" if report else text[-300:]))
        eta = (time.perf_counter() - t_start) / (i + 1) * (len(rows) - i - 1)
        print(f"[gpu_perf] {i + 1}/{len(rows)} {kind} {label}: {'ok' if report else 'FAILED'}; ETA {eta:.0f}s",
              file=sys.stderr, flush=True)
    table = render(results, sizes, args.smoke, time.perf_counter() - t_start)
    (out / "table.md").write_text(table)
    write_section(doc, table)
    print(table)
    return 0 if all(r[3] is not None for r in results if not r[4].startswith("skipped")) else 1


def render(results, sizes: dict, smoke: bool, seconds: float) -> str:
    """The Markdown section: a training table and a sampling table, plus failures."""
    lines = [f"Produced by `{'python tools/gpu_perf.py --smoke' if smoke else 'bash tools/gpu_perf.sh'}` "
             f"in {seconds:.0f} s (L = {sizes['seq_len']}, V = {sizes['vocab']} demo tokenizer, bf16, ZeRO-1; "
             "JSON of every row in the output directory).", "",
             "| training run | tokens/s | MFU | step s | device |", "|---|---|---|---|---|"]
    for kind, label, _cmd, rep, err in results:
        if kind == "train":
            if rep is None:
                lines.append(f"| {label} | failed | | | {err.splitlines()[-1] if err else ''} |")
            else:
                lines.append(f"| {label} | {rep['tokens_per_s']:,.0f} | {rep['mfu']:.1%} | {rep['step_time_s']:.3f} "
                             f"| {rep['device']} |")
    lines += ["", f"| sampler (batch {sizes['sample_batch']}, {sizes['sample_steps']} steps) | NFE/s | tokens/s "
              "| sampler overhead |", "|---|---|---|---|"]
    for kind, label, _cmd, rep, err in results:
        if kind == "sample":
            if rep is None:
                lines.append(f"| {label} | failed | | {err.splitlines()[-1] if err else ''} |")
                continue
            for name, s in rep["samplers"].items():
                lines.append(f"| {label} {name} | {s['nfe_per_s']:.2f} | {s['tokens_per_s']:,.0f} "
                             f"| {s['overhead_fraction']:.1%} |")
    return "\n".join(lines) + "\n"


def write_section(doc: Path, table: str) -> None:
    """Replace the text between the markers of ``doc`` by ``table`` (append the markers if missing)."""
    from udmtrain.utils.io import write_text_atomic

    text = doc.read_text() if doc.is_file() else ""
    block = f"{BEGIN}\n{table}{END}"
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = text + ("\n" if text and not text.endswith("\n") else "") + block + "\n"
    write_text_atomic(doc, text)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
