"""Export a checkpoint's network weights as a self-contained directory (no DeepSpeed needed to use it).

    python tools/export_ckpt.py runs/quickstart-audm --out exports/audm            # EMA weights, fp32
    python tools/export_ckpt.py runs/quickstart-audm/checkpoints/step_0000000200 --out exports/raw \\
        --no-ema --dtype bf16 --force
    python tools/export_ckpt.py runs/x --out exports/x tokenizer.path=data/demo/tokenizer.model  # override
    python tools/export_ckpt.py runs/udlm --format rev_udm --out udlm.ckpt   # the reference's layout

``--format rev_udm`` writes one Lightning-style ``.ckpt`` file in the paper's reference layout (raw
weights, EMA shadow list, plain-dict config) instead of a directory; see docs/interop.md.

``RUN_OR_STEP_DIR`` is a run directory, its ``checkpoints/`` directory (both via ``latest``) or a
complete ``step_XXXXXXXXXX`` directory; trailing ``section.key=value`` arguments override the saved
recipe (e.g. a moved tokenizer). ``--out DIR`` receives:

    model.pt           the network's ``state_dict()`` (EMA weights by default, ``--no-ema``: the raw fp32
                       weights merged from the DeepSpeed shards), floating tensors cast to ``--dtype``
    model.safetensors  the same tensors, only when the optional ``safetensors`` package is importable
    recipe.yaml        the resolved recipe; ``tokenizer.path`` points at DIR/tokenizer.model when copied
    tokenizer.model    a copy of the run's tokenizer when it is a local sentencepiece model
    meta.json          source checkpoint, step, ema, dtype, vocab_size, num_parameters, sha256 of each file

The write is atomic: everything goes to ``DIR.tmp-<pid>``, which is renamed to ``DIR`` at the end (a
crash leaves no half export under DIR). An existing DIR is refused unless ``--force``, and ``--force``
replaces only an empty directory or an earlier export that holds nothing but its own files: a run, a
directory of several exports or anything else is refused with what it holds, and so is a DIR at,
around or inside RUN_OR_STEP_DIR. ``--format rev_udm`` takes a file path (a directory is refused).

Loading an export back (plain PyTorch + udmtrain, no engine, no checkpoint)::

    import json, torch
    from udmtrain.config import load_recipe
    from udmtrain.train.build import build_components

    meta = json.load(open("exports/audm/meta.json"))
    cfg = load_recipe("exports/audm/recipe.yaml")   # after moving DIR: add ["tokenizer.path=NEW/tokenizer.model"]
    components = build_components(cfg, meta["vocab_size"])   # process, schedule, sampler, ... and the model
    model = components.model
    model.load_state_dict(torch.load("exports/audm/model.pt", map_location="cpu", weights_only=True))
    model.eval()                                     # a bf16 export: model.to(torch.bfloat16) first, or keep fp32

``udmtrain.data.tokenizers.load_tokenizer(cfg.tokenizer)`` gives the tokenizer (DIR/tokenizer.model).

The tools load an export like a checkpoint: ``python tools/sample.py --ckpt exports/audm``, and
``tools/gen_ppl.py`` / ``tools/eval_ppl.py`` / ``--judge`` the same way (its recipe and weights; an
export holds one set of weights, so ``--no-ema`` needs an export made with ``--no-ema``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from udmtrain.train import inference as inf  # noqa: E402
from udmtrain.utils.io import check_writable  # noqa: E402

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
TOKENIZER_FILE = "tokenizer.model"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", metavar="RUN_OR_STEP_DIR", help="run dir, its checkpoints/ dir, or a step_XXXXXXXXXX dir")
    p.add_argument("--out", required=True, help="export directory (created with its parents; must not exist "
                                                "unless --force); --format rev_udm: a .ckpt file")
    p.add_argument("--no-ema", action="store_true", help="export the raw weights instead of the EMA")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of the floating tensors")
    p.add_argument("--force", action="store_true", help="replace an existing --out: an empty directory or an earlier "
                                                         "export (anything else is refused)")
    p.add_argument("--format", choices=["udmtrain", "rev_udm"], default="udmtrain",
                   help="udmtrain: a directory (default); rev_udm: a reference-layout .ckpt file (raw + EMA, fp32)")
    return p


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def export_state_dict(model: Any, dtype: str) -> dict[str, Any]:
    """``model.state_dict()`` on CPU, floating tensors cast to ``dtype`` (others, e.g. int buffers, as is);
    every tensor is a fresh contiguous copy (no shared storage, so safetensors accepts tied weights)."""
    import torch

    target = getattr(torch, DTYPES[dtype])
    return {k: (v.detach().to("cpu", target) if v.is_floating_point() else v.detach().cpu()).contiguous().clone()
            for k, v in model.state_dict().items()}


def _check_out(out: Path, source: str | os.PathLike, force: bool) -> None:
    """Refuse an ``--out`` at, around or inside the source, and (``--force``) anything but an empty
    directory or an earlier export (``exports.check_out_dir``); create its parent."""
    from udmtrain.train.exports import check_out_dir, is_replaceable_export

    check_out_dir(out, [source], force, is_replaceable_export, "an export of tools/export_ckpt.py")
    out.parent.mkdir(parents=True, exist_ok=True)  # --out exports/x on a fresh clone: create exports/


def write_export(loaded: inf.Loaded, tmp: Path, final: Path, dtype: str) -> dict[str, Any]:
    """Write model.pt (+ .safetensors), tokenizer copy, recipe.yaml and meta.json into ``tmp``; returns meta.

    ``final`` is where ``tmp`` will be renamed to: the recipe's tokenizer path names the copy there.
    """
    import torch

    from udmtrain.config import dump_yaml

    state = export_state_dict(loaded.model, dtype)
    torch.save(state, tmp / "model.pt")
    files = {"model.pt": sha256_file(tmp / "model.pt")}
    try:
        from safetensors.torch import save_file
    except ImportError:  # optional: no new dependency
        save_file = None
    if save_file is not None:
        save_file(state, os.fspath(tmp / "model.safetensors"), metadata={"format": "pt"})
        os.chmod(tmp / "model.safetensors", 0o644)  # it is written 0600; match the other files
        files["model.safetensors"] = sha256_file(tmp / "model.safetensors")

    recipe = loaded.cfg.to_dict()
    tokenizer = loaded.tokenizer.identity()
    copied = None
    if loaded.cfg.tokenizer.name == "sentencepiece" and os.path.isfile(tokenizer.get("path", "")):
        shutil.copyfile(tokenizer["path"], tmp / TOKENIZER_FILE)
        files[TOKENIZER_FILE] = sha256_file(tmp / TOKENIZER_FILE)
        copied = os.fspath(final.resolve() / TOKENIZER_FILE)
        recipe["tokenizer"] = {**recipe["tokenizer"], "path": copied}
    (tmp / "recipe.yaml").write_text(dump_yaml(recipe))
    files["recipe.yaml"] = sha256_file(tmp / "recipe.yaml")

    meta = {
        "source_checkpoint": os.fspath(loaded.step_dir.resolve()), "run_name": loaded.meta.get("run_name"),
        "step": loaded.step, "tokens_seen": loaded.meta.get("tokens_seen"), "ema": loaded.use_ema,
        "dtype": dtype, "vocab_size": loaded.vocab_size, "model": loaded.cfg.model.name,
        "model_class": type(loaded.model).__name__,
        "num_parameters": sum(p.numel() for p in loaded.model.parameters()),
        "sha256": files["model.pt"], "files": files,
        "tokenizer": {**tokenizer, "copied_to": copied},
        "source_meta": loaded.meta, "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
    return meta


def export(path: str | os.PathLike, out: str | os.PathLike, use_ema: bool = True, dtype: str = "fp32",
           force: bool = False, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Export the checkpoint at ``path`` into ``out`` atomically (see the module docstring); returns meta."""
    from udmtrain.train.exports import swap_in

    final = Path(out).expanduser()
    _check_out(final, path, force)  # before the (slow) load: fail fast
    loaded = inf.load_for_inference(path, overrides=overrides, use_ema=use_ema, device="cpu")
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        meta = write_export(loaded, tmp, final, dtype)
        _check_out(final, path, force)  # someone may have put something there meanwhile
        swap_in(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def export_rev_udm(args: argparse.Namespace, overrides: list[str]) -> int:
    """``--format rev_udm``: one reference-layout checkpoint file (``udmtrain.interop.exporter``)."""
    from udmtrain.interop.errors import InteropError
    from udmtrain.interop.exporter import export_reference

    if args.no_ema or args.dtype != "fp32":
        raise inf.InferenceError("--format rev_udm writes the raw and the EMA weights in fp32; drop --no-ema/--dtype")
    try:
        report = export_reference(args.path, args.out, overrides, force=args.force)
    except InteropError as err:
        raise inf.InferenceError(str(err)) from err
    print(f"exported {report['source_checkpoint']} (step {report['step']}, {report['algo']}) -> {report['out']} "
          "(rev_udm layout)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args, unknown = build_parser().parse_known_args(argv)
    if args.format == "rev_udm":  # one file: a directory there is refused now, not after the conversion
        check_writable(args.out, "--out")
        return export_rev_udm(args, inf.split_overrides(unknown))
    check_writable(os.path.dirname(os.path.abspath(args.out)), "--out", directory=True)
    meta = export(args.path, args.out, use_ema=not args.no_ema, dtype=args.dtype, force=args.force,
                  overrides=inf.split_overrides(unknown))
    print(f"exported {meta['source_checkpoint']} (step {meta['step']}, {'EMA' if meta['ema'] else 'raw'} weights, "
          f"{meta['dtype']}, {meta['num_parameters']:,} parameters) -> {args.out}: "
          + ", ".join(sorted(meta["files"])))
    return 0


if __name__ == "__main__":
    sys.exit(inf.run_cli(main))
