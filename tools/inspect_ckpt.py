"""What a udmtrain run's checkpoints hold, read from the files alone (no DeepSpeed engine, no weights merge).

    python tools/inspect_ckpt.py runs/quickstart-audm                  # the run: every checkpoint + latest
    python tools/inspect_ckpt.py runs/quickstart-audm/checkpoints/step_0000000200 --json

``RUN_OR_STEP_DIR`` is a run directory, its ``checkpoints/`` directory (both resolve through ``latest``)
or one complete ``step_XXXXXXXXXX`` directory (that one is detailed; its siblings are still listed).

Reported: the run's complete checkpoints (step, tokens seen, bytes on disk, which one ``latest`` names,
plus any unfinished ``*.tmp-*`` leftovers), and for the chosen checkpoint its meta.json, a recipe summary
(model name + dims, process, parameterization, loss, sampler, tokenizer, seq_len, world size, ZeRO
stage, precision), the parameter count (the recipe's model built on the ``meta`` device: no memory, no
weights read), whether an EMA is stored (its ``num_updates`` and ``decay``), the train-state counters
(step, tokens_seen, total_skipped, num_nonfinite) and each rank's data cursor (per logical loader
worker ``[epoch, samples emitted in that epoch]``). ``--json`` prints the same as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from udmtrain.train import inference as inf  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", metavar="RUN_OR_STEP_DIR", help="run dir, its checkpoints/ dir, or a step_XXXXXXXXXX dir")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the text report")
    return p


def dir_bytes(path: Path) -> int:
    """Total size in bytes of the regular files under ``path`` (symlinks not followed)."""
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            full = os.path.join(dirpath, name)
            if not os.path.islink(full):
                total += os.path.getsize(full)
    return total


def human_bytes(n: int) -> str:
    """``1536 -> '1.5 KiB'``."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _read_meta(step_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((step_dir / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise inf.InferenceError(f"{step_dir / 'meta.json'} cannot be read: {err}") from err


def list_checkpoints(ckpt_dir: Path) -> dict[str, Any]:
    """The complete checkpoints of ``ckpt_dir`` (oldest first), ``latest``'s name and unfinished leftovers."""
    from udmtrain.train.checkpoint import LATEST, complete_checkpoints

    latest_file = ckpt_dir / LATEST
    latest = latest_file.read_text().strip() if latest_file.is_file() else None
    rows = []
    for step_dir in complete_checkpoints(ckpt_dir):
        meta = _read_meta(step_dir)
        rows.append({"name": step_dir.name, "path": os.fspath(step_dir), "step": meta.get("step"),
                     "tokens_seen": meta.get("tokens_seen"), "bytes": dir_bytes(step_dir),
                     "latest": step_dir.name == latest})
    unfinished = sorted(p.name for p in ckpt_dir.glob("step_*.tmp-*")) if ckpt_dir.is_dir() else []
    return {"directory": os.fspath(ckpt_dir), "latest": latest, "checkpoints": rows, "unfinished": unfinished}


def recipe_summary(recipe: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """The architecture-and-setup fields of a saved recipe dict (``recipe.yaml`` as plain YAML)."""
    def name(section: str) -> Any:
        value = recipe.get(section)
        return value.get("name") if isinstance(value, dict) else None

    engine, data = recipe.get("engine") or {}, recipe.get("data") or {}
    model = dict(recipe.get("model") or {})
    sampler = recipe.get("sampler")
    return {
        "model": model.pop("name", None), "model_config": model,
        "process": name("process"), "schedule": name("schedule"), "parameterization": name("parameterization"),
        "loss": name("loss"), "sampler": dict(sampler) if isinstance(sampler, dict) else None,
        "tokenizer": recipe.get("tokenizer"), "seq_len": data.get("seq_len"),
        "world_size": meta.get("world_size"), "zero_stage": engine.get("zero_stage"),
        "precision": engine.get("precision"), "micro_batch_size": engine.get("micro_batch_size"),
        "global_batch_size": engine.get("global_batch_size"), "ema_decay": (recipe.get("train") or {}).get("ema_decay"),
    }


def count_parameters(step_dir: Path, meta: dict[str, Any], ema_shadow: dict | None) -> dict[str, Any]:
    """Parameters of the recipe's model, built on the ``meta`` device (allocates nothing).

    Falls back to the EMA shadow (which holds every named parameter) when the recipe no longer
    builds (e.g. a component renamed since); ``source`` says which was used.
    """
    import torch

    from udmtrain.config import ConfigError, load_recipe
    from udmtrain.train.build import build_components

    try:
        cfg = load_recipe(os.fspath(step_dir / "recipe.yaml"))
        vocab = meta.get("vocab_size")
        if not vocab:
            from udmtrain.data.tokenizers import load_tokenizer
            vocab = load_tokenizer(cfg.tokenizer).vocab_size
        with torch.device("meta"):
            model = build_components(cfg, int(vocab), with_sampler=False).model
        params = list(model.parameters())
        return {"num_parameters": sum(p.numel() for p in params), "num_tensors": len(params),
                "model_class": type(model).__name__, "source": "recipe (meta device)"}
    except (ConfigError, ValueError, TypeError, KeyError, FileNotFoundError, RuntimeError) as err:
        if ema_shadow is None:
            return {"num_parameters": None, "source": None, "error": f"{type(err).__name__}: {err}"}
        return {"num_parameters": sum(t.numel() for t in ema_shadow.values()), "num_tensors": len(ema_shadow),
                "source": "ema shadow", "error": f"{type(err).__name__}: {err}"}


def cursor_summary(cursor: dict[str, Any]) -> dict[str, Any]:
    """The loader's cursor without anything bulky: per logical worker ``[epoch, samples emitted]``."""
    keys = ("cursors", "next_worker", "num_logical_workers", "batch_size", "seed", "num_shards", "num_corrupt",
            "world_size", "rank")
    return {k: cursor[k] for k in keys if k in cursor}


def inspect_step(step_dir: Path) -> dict[str, Any]:
    """Everything about one complete step directory (see the module docstring)."""
    import yaml

    from udmtrain.engine.deepspeed_engine import check_checkpoint_files
    from udmtrain.train.checkpoint import load_rank_state

    meta = _read_meta(step_dir)
    recipe_path = step_dir / "recipe.yaml"
    if not recipe_path.is_file():
        raise inf.CheckpointNotFound(f"{step_dir} has no recipe.yaml; it was not written by udmtrain's Checkpointer")
    recipe = yaml.safe_load(recipe_path.read_text()) or {}
    world = int(meta.get("world_size") or 1)
    check_checkpoint_files(step_dir)  # refuse foreign code in the DeepSpeed shards up front
    ranks, state0 = [], None
    for rank in range(world):
        path = step_dir / f"rank{rank}_state.pt"
        if not path.is_file():
            ranks.append({"rank": rank, "missing": os.fspath(path)})
            continue
        state = load_rank_state(step_dir, rank)
        if rank == 0:
            state0 = state
        ranks.append({"rank": rank, **cursor_summary(state.get("data_cursor") or {})})
    if state0 is None:
        raise inf.CheckpointNotFound(f"{step_dir / 'rank0_state.pt'} does not exist; the checkpoint is incomplete")
    ema = state0.get("ema")
    shadow = dict(ema["shadow"]) if ema else None
    return {
        "path": os.fspath(step_dir), "meta": meta, "recipe": recipe_summary(recipe, meta),
        "parameters": count_parameters(step_dir, meta, shadow),
        "ema": ({"present": True, "num_updates": ema.get("num_updates"), "decay": ema.get("decay"),
                 "num_tensors": len(shadow)} if ema else {"present": False}),
        "train_state": {k: state0.get(k) for k in ("step", "tokens_seen", "total_skipped", "num_nonfinite",
                                                   "format_version")},
        "data_cursors": ranks,
        "files": sorted(os.fspath(p.relative_to(step_dir)) for p in step_dir.rglob("*") if p.is_file()),
    }


def inspect(path: str | os.PathLike) -> dict[str, Any]:
    """``{"run": ..., "checkpoint_dir": {...listing...}, "chosen": {...inspect_step...}}`` for ``path``."""
    step_dir = inf.resolve_checkpoint(path)
    from udmtrain.train.exports import is_export

    if is_export(step_dir):  # model.pt + recipe.yaml + meta.json: no DeepSpeed shards, train state or cursors
        raise inf.InferenceError(
            f"{os.fspath(path)} is an export of tools/export_ckpt.py, not a training checkpoint: its meta.json "
            f"names the source checkpoint and step, recipe.yaml the model; the tools load it with --ckpt {os.fspath(path)}")
    ckpt_dir = step_dir.parent
    run_dir = ckpt_dir.parent if ckpt_dir.name == "checkpoints" else None
    return {"run": os.fspath(run_dir) if run_dir is not None else None, **list_checkpoints(ckpt_dir),
            "chosen": inspect_step(step_dir)}


def _fmt(value: Any) -> str:
    return "-" if value is None else (f"{value:,}" if isinstance(value, int) and not isinstance(value, bool)
                                      else str(value))


def render(report: dict[str, Any]) -> str:
    """The human-readable report."""
    lines = [f"run          {report['run'] or '-'}", f"checkpoints  {report['directory']}  (latest -> "
             f"{report['latest'] or 'missing'})", ""]
    lines.append(f"  {'':1} {'step':>10}  {'tokens seen':>15}  {'size':>10}  name")
    for row in report["checkpoints"]:
        mark = "*" if row["latest"] else " "
        lines.append(f"  {mark} {_fmt(row['step']):>10}  {_fmt(row['tokens_seen']):>15}  "
                     f"{human_bytes(row['bytes']):>10}  {row['name']}")
    for name in report["unfinished"]:
        lines.append(f"  ! unfinished write (ignored by resume): {name}")
    c = report["chosen"]
    r, meta, params, ema, ts = c["recipe"], c["meta"], c["parameters"], c["ema"], c["train_state"]
    dims = ", ".join(f"{k}={v}" for k, v in r["model_config"].items() if v is not None and k != "deepspeed_extra")
    sampler = r["sampler"] or {}
    tok = r["tokenizer"] or {}
    lines += ["", f"chosen       {c['path']}",
              "meta         " + ", ".join(f"{k}={v}" for k, v in sorted(meta.items())),
              f"model        {r['model']} ({dims})",
              f"parameters   {_fmt(params.get('num_parameters'))}"
              + (f"  [{params['model_class']}]" if params.get("model_class") else "")
              + (f"  (from {params['source']}: {params['error']})" if params.get("error") else ""),
              f"diffusion    process={r['process'] or '- (autoregressive)'}, schedule={r['schedule'] or '-'}, "
              f"parameterization={r['parameterization'] or '-'}",
              f"loss         {r['loss']}",
              f"sampler      {sampler.get('name', '-')}"
              + (f" ({', '.join(f'{k}={v}' for k, v in sampler.items() if k != 'name')})" if sampler else ""),
              f"tokenizer    {tok.get('name', '-')} {tok.get('path', '')}".rstrip(),
              f"setup        seq_len={r['seq_len']}, world_size={r['world_size']}, zero_stage={r['zero_stage']}, "
              f"precision={r['precision']}, micro_batch={r['micro_batch_size']}, global_batch={r['global_batch_size']}",
              "ema          " + (f"present: num_updates={ema['num_updates']}, decay={ema['decay']}" if ema["present"]
                                 else "absent (train.ema_decay was 0)"),
              f"train state  step={_fmt(ts['step'])}, tokens_seen={_fmt(ts['tokens_seen'])}, "
              f"total_skipped={_fmt(ts['total_skipped'])}, num_nonfinite={_fmt(ts['num_nonfinite'])}"]
    for cur in c["data_cursors"]:
        if "missing" in cur:
            lines.append(f"data cursor  rank {cur['rank']}: MISSING {cur['missing']}")
            continue
        lines.append(f"data cursor  rank {cur['rank']}: [epoch, samples] per worker {cur.get('cursors')}, "
                     f"next_worker={cur.get('next_worker')}, shards={cur.get('num_shards')}, "
                     f"batch={cur.get('batch_size')}, seed={cur.get('seed')}, corrupt={cur.get('num_corrupt')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    report = inspect(args.path)
    print(json.dumps(report, indent=2, default=str) if args.json else render(report))
    return 0


if __name__ == "__main__":
    sys.exit(inf.run_cli(main))
