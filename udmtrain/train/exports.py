"""Exports of tools/export_ckpt.py read back for inference: ``--ckpt exports/NAME`` works in every tool.

An export holds ``model.pt`` (one set of weights, fp32 or bf16), the resolved ``recipe.yaml`` and
``meta.json`` (with ``source_checkpoint``); ``load_for_inference`` hands such a directory to
``load_export``, which returns the same ``Loaded`` a checkpoint gives.

The guard of an output directory that a tool writes whole and replaces with ``--force``
(tools/export_ckpt.py, tools/import_ckpt.py) lives here too: ``check_out_dir`` refuses an ``--out``
that would overwrite the source or anything that is not that tool's own earlier output, and
``swap_in`` puts the finished directory in place.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from udmtrain.train.components import build_components
from udmtrain.train.inference import InferenceError, Loaded
from udmtrain.utils.io import OutputError


def is_export(path: str | os.PathLike) -> bool:
    """True for a directory written by tools/export_ckpt.py (model.pt, recipe.yaml, meta.json naming its
    ``source_checkpoint``)."""
    p = Path(path)
    if not ((p / "model.pt").is_file() and (p / "recipe.yaml").is_file() and (p / "meta.json").is_file()):
        return False
    try:
        return "source_checkpoint" in json.loads((p / "meta.json").read_text())
    except (OSError, ValueError):
        return False


def is_replaceable_export(path: str | os.PathLike) -> bool:
    """True for an export (``is_export``) that holds nothing but the files its meta.json lists: what
    ``--force`` may delete. A file someone added to it keeps it from being replaced."""
    p = Path(path)
    if not is_export(p):
        return False
    try:
        files = set(json.loads((p / "meta.json").read_text()).get("files", {}))
    except (OSError, ValueError, AttributeError):
        return False
    return {child.name for child in p.iterdir()} <= files | {"meta.json"}


def _listing(path: Path, limit: int = 4) -> str:
    """``checkpoints/, notes.txt and 3 more``: what a directory holds, for a one-line message."""
    names = sorted(f"{c.name}/" if c.is_dir() else c.name for c in path.iterdir())
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_outside_sources(out: str | os.PathLike, sources: Sequence[str | os.PathLike], flag: str = "--out") -> None:
    """Refuse an output ``out`` that is, contains or lies inside one of ``sources`` (what it is made
    from): writing or replacing it would damage the source. Symbolic links are resolved first."""
    target = Path(out).expanduser().resolve()
    for source in sources:
        src = Path(source).expanduser().resolve()
        relation = ("is" if target == src else "contains" if target in src.parents
                    else "is inside" if src in target.parents else None)
        if relation is not None:
            raise OutputError(f"{flag} {out} {relation} the source {source}; writing there could destroy it: choose "
                              f"an {flag} elsewhere (not at, above or inside the source)")


def check_out_dir(out: str | os.PathLike, sources: Sequence[str | os.PathLike], force: bool,
                  replaceable: Callable[[Path], bool], what: str, flag: str = "--out") -> None:
    """Refuse an output directory ``out`` that a tool may not create or (``force``) replace.

    Always refused: ``out`` at, around or inside a source (``check_outside_sources``), and an existing
    ``out`` that is not a directory. An existing directory needs ``force``, and even then only an empty
    one or one that ``replaceable`` recognises as ``what`` (the tool's own earlier output) is replaced;
    a run, a parent of several outputs or a data directory is refused with a listing of what it holds.
    Raises ``OutputError`` (one line naming ``flag``); call it before the work and again just before
    ``swap_in``.
    """
    check_outside_sources(out, sources, flag)
    path = Path(out).expanduser()
    if not path.exists():
        return
    if not path.is_dir():
        raise OutputError(f"{flag} {out} exists and is not a directory; remove it or choose another path")
    if any(path.iterdir()) and not replaceable(path):
        raise OutputError(f"{flag} {out} holds {_listing(path)}; --force replaces only an empty directory or {what} "
                          f"with nothing added to it: choose another {flag}, or remove that directory yourself if it "
                          "may go")
    if not force:
        raise OutputError(f"{flag} {out} already exists; pass --force to replace it, or choose another directory")


def swap_in(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """Rename the finished directory ``tmp`` to ``final``. A previous ``final`` is first renamed to
    ``final.old-<pid>`` (put back if the rename fails) and deleted only once ``tmp`` is in place."""
    tmp, final = Path(tmp), Path(final)
    trash = None
    if final.exists():
        trash = final.with_name(f"{final.name}.old-{os.getpid()}")
        os.rename(final, trash)
    try:
        os.rename(tmp, final)
    except OSError:
        if trash is not None:
            os.rename(trash, final)
        raise
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def load_export(export_dir: str | os.PathLike, overrides: Sequence[str] = (), use_ema: bool = True,
                device: str | torch.device = "cpu") -> Loaded:
    """An export of tools/export_ckpt.py as a ``Loaded`` (what ``load_for_inference`` returns for one):
    its recipe (+ ``overrides``) and ``model.pt`` weights, computed in fp32 like a checkpoint's (a bf16
    export is upcast). An export holds one set of weights, so ``use_ema=False`` on an EMA export is
    an error that names the source checkpoint."""
    from udmtrain.config import load_recipe
    from udmtrain.data.tokenizers import load_tokenizer

    export_dir = Path(export_dir)
    meta = json.loads((export_dir / "meta.json").read_text())
    if not use_ema and meta.get("ema"):
        raise InferenceError(f"{export_dir} is an export of the EMA weights; for the raw weights use its source "
                             f"checkpoint {meta['source_checkpoint']} or export again with --no-ema")
    cfg = load_recipe(os.fspath(export_dir / "recipe.yaml"), list(overrides))
    tokenizer = load_tokenizer(cfg.tokenizer)
    vocab_size = int(meta["vocab_size"])
    try:
        components = build_components(cfg, vocab_size)
    except ValueError as err:
        raise InferenceError(f"{export_dir}: cannot build the recipe's components: {err}") from err
    state = torch.load(export_dir / "model.pt", map_location="cpu", weights_only=True)
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    missing, unexpected = components.model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise InferenceError(f"{export_dir}: weights do not match the recipe's model (missing {sorted(missing)[:5]}, "
                             f"unexpected {sorted(unexpected)[:5]})")
    device = torch.device(device)
    model = components.model.to(device).eval()
    model.requires_grad_(False)
    run_meta = {**meta.get("source_meta", {}), "step": meta["step"], "export": os.fspath(export_dir)}
    return Loaded(cfg=cfg, components=components, model=model, tokenizer=tokenizer, step_dir=export_dir,
                  meta=run_meta, vocab_size=vocab_size, use_ema=bool(meta.get("ema")), device=device)
