"""Reference checkpoint layouts: read them safely, and write the rev_udm layout back (export).

Layouts (``--from``):

* ``rev_udm``: the paper's Lightning checkpoint: ``state_dict`` with the DiT under
  ``diffusion.model.backbone.``, ``ema = {decay, num_updates, shadow_params: [...], collected_params}``
  (the shadow list in the backbone's ``parameters()`` order), ``hyper_parameters.config`` (OmegaConf);
* ``mdlm``: the MDLM / UDLM / DUO Lightning checkpoints: the same, with the DiT under ``backbone.``;
* ``hub``: a directory with MDLM's published ``model.safetensors`` + ``config.json`` (one set of
  weights under ``backbone.``, HF-style config; see ``read_hub``).

Every tensor outside the backbone prefix is an error (nothing is silently dropped), as is an EMA
list that does not match the backbone's parameters one to one.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from udmtrain.interop.errors import InteropError
from udmtrain.interop.keys import ROPE_BUFFER
from udmtrain.interop.safe_pickle import Placeholder, plain, safe_load

PREFIXES = {"rev_udm": "diffusion.model.backbone.", "mdlm": "backbone."}
"""Lightning layout -> prefix of the DiT's tensors in ``state_dict``."""
LAYOUTS = (*PREFIXES, "hub")


class ReferenceFormatError(InteropError):
    """A file that is not in the announced layout (names the file, the key and the expectation)."""


@dataclass
class ReferenceCheckpoint:
    """One foreign checkpoint, read without executing it."""

    path: str
    layout: str
    config: dict[str, Any]
    """The training config as plain dicts (OmegaConf placeholders unwrapped)."""
    backbone: dict[str, torch.Tensor]
    """The DiT's tensors, names without the layout prefix, in file order (parameters + RoPE buffer)."""
    ema_shadow: dict[str, torch.Tensor] | None = None
    """EMA weights by reference name (the shadow list zipped with the parameter order), if stored."""
    ema_decay: float | None = None
    ema_num_updates: int = 0
    info: dict[str, Any] = field(default_factory=dict)
    """JSON-able provenance (global_step, epoch, class name, Lightning version)."""


def _param_names(backbone: dict[str, torch.Tensor]) -> list[str]:
    """Parameter names in file order (= ``parameters()`` order: state_dict lists them by registration)."""
    return [k for k in backbone if k != ROPE_BUFFER]


def read_checkpoint(path: str | os.PathLike, layout: str) -> ReferenceCheckpoint:
    """Read a Lightning ``.ckpt`` in ``layout`` (``rev_udm`` or ``mdlm``) with the restricted unpickler."""
    if layout == "hub":
        return read_hub(path)
    if layout not in PREFIXES:
        raise ReferenceFormatError(f"--from {layout!r}: supported layouts are {list(LAYOUTS)}")
    path = os.fspath(path)
    obj = safe_load(path)
    if not isinstance(obj, dict) or not isinstance(obj.get("state_dict"), dict):
        raise ReferenceFormatError(f"{path}: not a Lightning checkpoint (no 'state_dict' dict at the top level)")
    prefix = PREFIXES[layout]
    state = obj["state_dict"]
    outside = [k for k in state if not k.startswith(prefix)]
    if outside:
        other = [name for name, p in PREFIXES.items() if p != prefix and all(k.startswith(p) for k in state)]
        hint = f"; the keys fit --from {other[0]}" if other else ""
        raise ReferenceFormatError(f"{path}: --from {layout} expects every state_dict key under {prefix!r}, found "
                                   f"{outside[:4]}{hint}")
    backbone = {k[len(prefix):]: v for k, v in state.items()}
    bad = [k for k, v in backbone.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ReferenceFormatError(f"{path}: state_dict entries {bad[:4]} are not tensors")
    hparams = plain(obj.get("hyper_parameters") or {})
    config = hparams.get("config") if isinstance(hparams, dict) else None
    if not isinstance(config, dict):
        raise ReferenceFormatError(f"{path}: hyper_parameters.config is missing or not a config mapping")
    model_cls = hparams.get("diffusion_model")
    info = {"source": os.path.abspath(path), "layout": layout, "global_step": obj.get("global_step"),
            "epoch": obj.get("epoch"), "lightning_version": obj.get("pytorch-lightning_version"),
            "class": model_cls.qualname() if isinstance(model_cls, type) and issubclass(model_cls, Placeholder)
            else None}
    ckpt = ReferenceCheckpoint(path=path, layout=layout, config=config, backbone=backbone, info=info)
    ema = obj.get("ema")
    if ema is not None:
        _attach_ema(ckpt, ema)
    return ckpt


def _attach_ema(ckpt: ReferenceCheckpoint, ema: Any) -> None:
    """Zip ``ema['shadow_params']`` with the backbone's parameter order, checking count and shapes."""
    shadow = ema.get("shadow_params") if isinstance(ema, dict) else None
    if not isinstance(shadow, (list, tuple)) or not all(isinstance(t, torch.Tensor) for t in shadow):
        raise ReferenceFormatError(f"{ckpt.path}: 'ema' has no list of tensors 'shadow_params'")
    names = _param_names(ckpt.backbone)
    if len(shadow) != len(names):
        raise ReferenceFormatError(f"{ckpt.path}: ema.shadow_params has {len(shadow)} tensors but the backbone has "
                                   f"{len(names)} parameters")
    mismatched = [f"{n} {tuple(ckpt.backbone[n].shape)} vs shadow {tuple(t.shape)}"
                  for n, t in zip(names, shadow) if t.shape != ckpt.backbone[n].shape]
    if mismatched:
        raise ReferenceFormatError(f"{ckpt.path}: ema.shadow_params is not in the backbone's parameter order: "
                                   + "; ".join(mismatched[:3]))
    ckpt.ema_shadow = dict(zip(names, shadow))
    ckpt.ema_decay = float(ema["decay"]) if ema.get("decay") is not None else None
    ckpt.ema_num_updates = int(ema.get("num_updates") or 0)


HUB_FIELDS = {"vocab_size": None, "model_length": "model.length", "hidden_dim": "model.hidden_size",
              "cond_dim": "model.cond_dim", "n_blocks": "model.n_blocks", "n_heads": "model.n_heads",
              "dropout": "model.dropout", "time_conditioning": "time_conditioning"}
"""MDLM hub ``config.json`` fields read by ``read_hub`` (-> the Lightning config key they become)."""


def read_hub(path: str | os.PathLike) -> ReferenceCheckpoint:
    """MDLM's hub format: ``DIR/model.safetensors`` (DiT under ``backbone.``) + ``DIR/config.json``
    (``model_type: mdlm`` and the ``HUB_FIELDS``). One set of weights (the published EMA); no training
    config, so the schedule eps must come from ``--eps`` (the caller puts it in ``training.sampling_eps``).
    """
    path = os.fspath(path)
    weights, cfg_file = os.path.join(path, "model.safetensors"), os.path.join(path, "config.json")
    for f in (weights, cfg_file):
        if not os.path.isfile(f):
            raise ReferenceFormatError(f"--from hub expects a directory with model.safetensors and config.json; "
                                       f"{f} does not exist")
    hub = json.loads(Path(cfg_file).read_text())
    if hub.get("model_type") != "mdlm":
        raise ReferenceFormatError(f"{cfg_file}: model_type={hub.get('model_type')!r}; only MDLM's hub format "
                                   "(model_type 'mdlm') is recognised")
    missing = [k for k in HUB_FIELDS if k not in hub]
    if missing:
        raise ReferenceFormatError(f"{cfg_file}: missing {missing}")
    from safetensors.torch import load_file

    state = load_file(weights)
    prefix = PREFIXES["mdlm"]
    outside = [k for k in state if not k.startswith(prefix)]
    if outside:
        raise ReferenceFormatError(f"{weights}: expected every tensor under {prefix!r}, found {outside[:4]}")
    backbone = {k[len(prefix):]: v for k, v in state.items()}
    config: dict[str, Any] = {"diffusion": "absorbing_state", "parameterization": "subs", "backbone": "dit",
                              "model": {"type": "ddit", "scale_by_sigma": False}}
    for key, target in HUB_FIELDS.items():
        if target is None:
            continue
        node = config
        *parents, leaf = target.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = hub[key]
    info = {"source": os.path.abspath(path), "layout": "hub", "hub_vocab_size": hub["vocab_size"]}
    return ReferenceCheckpoint(path=path, layout="hub", config=config, backbone=backbone, info=info)


def write_checkpoint(path: str | os.PathLike, raw: dict[str, torch.Tensor], ema: dict[str, torch.Tensor] | None,
                     config: dict[str, Any], *, ema_decay: float, ema_num_updates: int, global_step: int,
                     layout: str = "rev_udm") -> None:
    """Write ``raw`` / ``ema`` (reference names, registration order) as a ``layout`` Lightning checkpoint.

    Only plain tensors, dicts, lists and scalars: ``torch.load(weights_only=True)`` reads it, and so does
    the reference (whose code expects an OmegaConf config: wrap ``hyper_parameters['config']`` with
    ``OmegaConf.create``, docs/interop.md). Written to ``path.tmp-<pid>`` and renamed (atomic).
    """
    prefix = PREFIXES[layout]
    names = _param_names(raw)
    state = {
        "epoch": 0, "global_step": int(global_step), "pytorch-lightning_version": "2.5.1",
        "state_dict": {prefix + k: v for k, v in raw.items()},
        "hyper_parameters": {"config": config},
        "ema": None if ema is None else {"decay": float(ema_decay), "num_updates": int(ema_num_updates),
                                         "shadow_params": [ema[n] for n in names], "collected_params": None},
    }
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
