"""Export a udmtrain diffusion DiT run in the reference (rev_udm) layout, so the reference's own
scripts can evaluate it; ``import_checkpoint`` of the result gives back the same weights bit for bit.

What is written (``reference.write_checkpoint``): ``state_dict`` under ``diffusion.model.backbone.``
(RoPE buffer included), ``ema.shadow_params`` in the reference's parameter order, and
``hyper_parameters.config`` as a plain dict (``recipe.config_from_recipe``). Only plain objects, so
``torch.load(weights_only=True)`` reads it; the head keeps udmtrain's width (V, or V + 1 with the mask).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from udmtrain.interop import keys as K
from udmtrain.interop.errors import InteropError
from udmtrain.interop.recipe import config_from_recipe
from udmtrain.interop.reference import write_checkpoint


def export_reference(path: str | os.PathLike, out: str | os.PathLike, overrides: tuple[str, ...] | list[str] = (),
                     force: bool = False) -> dict[str, Any]:
    """Write the run/step directory ``path`` as the rev_udm checkpoint file ``out``; returns a report.

    Refused before anything is loaded: an ``out`` that is a directory (this layout is one file), one
    inside ``path``, and an existing file without ``force``."""
    from udmtrain.train.exports import check_outside_sources
    from udmtrain.train.inference import load_for_inference, load_ema_shadow

    out = Path(out).expanduser()
    if out.is_dir():
        raise InteropError(f"--out {out} is a directory; --format rev_udm writes one .ckpt file: give the path of "
                           "the file to write")
    check_outside_sources(out, [path])
    if out.exists() and not force:
        raise InteropError(f"--out {out} already exists; pass --force to replace it")
    if not out.parent.is_dir():
        raise InteropError(f"--out {out}: its parent directory {out.parent} does not exist")
    loaded = load_for_inference(path, overrides=overrides, use_ema=False, device="cpu")
    config = config_from_recipe(loaded.cfg)
    model = loaded.model
    fusion = loaded.cfg.model.cfg.noise_conditioning
    head_dim = int(model.blocks[0].attn.head_dim)
    raw = K.to_reference(model.state_dict(), int(model.num_blocks), fusion, head_dim)
    shadow = load_ema_shadow(loaded.step_dir)
    ema = None if shadow is None else K.to_reference(shadow, int(model.num_blocks), fusion, head_dim)
    ema_state = _ema_meta(loaded.step_dir)
    write_checkpoint(out, raw, ema, config, ema_decay=ema_state.get("decay", loaded.cfg.train.ema_decay),
                     ema_num_updates=ema_state.get("num_updates", 0), global_step=loaded.step)
    return {"source_checkpoint": os.fspath(loaded.step_dir), "out": os.fspath(out), "format": "rev_udm",
            "algo": config["algo"]["name"], "ema": ema is not None, "step": loaded.step,
            "vocab_rows": int(raw["vocab_embed.embedding"].shape[0])}


def _ema_meta(step_dir: Path) -> dict[str, Any]:
    """``decay`` / ``num_updates`` of the EMA saved in ``rank0_state.pt`` (empty without EMA)."""
    from udmtrain.train.checkpoint import load_rank_state

    state = load_rank_state(step_dir, 0)
    ema = state.get("ema") or {}
    return {k: ema[k] for k in ("decay", "num_updates") if k in ema}
