"""Exports of tools/export_ckpt.py read back for inference: ``--ckpt exports/NAME`` works in every tool.

An export holds ``model.pt`` (one set of weights, fp32 or bf16), the resolved ``recipe.yaml`` and
``meta.json`` (with ``source_checkpoint``); ``load_for_inference`` hands such a directory to
``load_export``, which returns the same ``Loaded`` a checkpoint gives.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from udmtrain.train.components import build_components
from udmtrain.train.inference import InferenceError, Loaded

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
