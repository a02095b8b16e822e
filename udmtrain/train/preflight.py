"""Preflight: build what a run would build, without memory or data, and report what construction rejects.

``--dry-run`` (and every launch, before any process group starts) calls :func:`construction_issues`,
which instantiates the recipe's components exactly as training, sampling and evaluation do: the
network on the ``meta`` device (no memory), the optimizer and LR schedule over one dummy parameter.
Whatever a constructor rejects (``optim.lr=-1``, a cosine decay shorter than its warmup,
``sampler.top_p=0``, a process the model's ``noise_conditioning`` cannot serve, a key DeepSpeed's config
schema does not know in ``engine.deepspeed_extra``, ...) becomes a
``ConfigIssue`` pointing at the recipe line of the key it names. No second list of rules exists:
the rule "what construction rejects, the dry run rejects" holds because the dry run *is* construction.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from udmtrain.config.errors import ConfigIssue

FALLBACK_VOCAB = 64
"""V used when the recipe's tokenizer cannot be loaded here (e.g. offline): shapes do not matter on meta."""

_DOTTED = re.compile(r"\b([a-z_]+(?:\.[a-z_]+)+)\b")


def construction_issues(cfg: Any, vocab_size: int | None = None) -> list[ConfigIssue]:
    """Build every component of ``cfg`` (a validated ``RunConfig``); one issue per constructor refusal.

    ``vocab_size``: V of the tokenizer (default: loaded from the recipe, else ``FALLBACK_VOCAB``).
    """
    from udmtrain.engine.optim import build_lr_schedule, build_optimizer
    from udmtrain.train.components import build_components

    if vocab_size is None:
        vocab_size = _vocab_size(cfg)
    issues: list[ConfigIssue] = []

    def attempt(section: str, build) -> Any:
        try:
            return build()
        except (ValueError, TypeError, KeyError, ImportError) as err:  # ImportError: attn_backend=flash, no flash_attn
            issues.append(_issue(cfg, section, err))
            return None

    with torch.device("meta"):
        components = attempt("model", lambda: build_components(cfg, vocab_size, with_sampler=True))
    check_seq_len = getattr(getattr(components, "model", None), "check_seq_len", None)
    if check_seq_len is not None:  # e.g. a learned position table shorter than data.seq_len
        attempt("model", lambda: check_seq_len(int(cfg.data.seq_len)))
    if cfg.engine.deepspeed_extra:  # DeepSpeed's own schema, only when the recipe adds keys (its import costs seconds)
        from udmtrain.engine.deepspeed_engine import build_ds_config, check_ds_config

        attempt("engine", lambda: check_ds_config(build_ds_config(cfg.engine, 1)))
    optimizer = attempt("optim", lambda: build_optimizer(cfg.optim.name, cfg.optim.cfg, device="cpu")(
        [torch.nn.Parameter(torch.zeros(1))]))
    if optimizer is not None:
        attempt("lr_schedule", lambda: build_lr_schedule(cfg.lr_schedule.name, cfg.lr_schedule.cfg,
                                                         cfg.train.max_steps)(optimizer))
    return issues


def _vocab_size(cfg: Any) -> int:
    from udmtrain.data.errors import DataError
    from udmtrain.data.tokenizers import load_tokenizer

    try:
        return int(load_tokenizer(cfg.tokenizer).vocab_size)
    except (DataError, OSError, ValueError):
        return FALLBACK_VOCAB


def _issue(cfg: Any, section: str, err: Exception) -> ConfigIssue:
    """The refusal as an issue at the recipe key its message names (else at ``section``)."""
    message = str(err).splitlines()[0] if str(err) else type(err).__name__
    origins: dict[str, str] = getattr(cfg, "origins", {}) or {}
    path = next((p for p in _DOTTED.findall(message) if p in origins or _is_field(cfg, p)), None)
    if path is None:  # a bare field name ("invalid learning rate") -> the section's field it matches
        path = next((f"{section}.{f}" for f in _fields(cfg, section) if re.search(rf"\b{f.replace('_', '.?')}\b",
                                                                                   message, re.I)), section)
    origin = origins.get(path) or origins.get(f"{path.split('.')[0]}.name") or "recipe"
    return ConfigIssue(path, origin, f"rejected when the run is built: {message}")


def _fields(cfg: Any, section: str) -> list[str]:
    spec = getattr(cfg, section, None)
    inner = getattr(spec, "cfg", spec)
    fields = getattr(inner, "__dataclass_fields__", {})
    return sorted(fields, key=len, reverse=True)


def _is_field(cfg: Any, path: str) -> bool:
    section, _, key = path.partition(".")
    return key in _fields(cfg, section)
