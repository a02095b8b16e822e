"""What TensorBoard shows besides scalars: the recipe and its hyperparameters at the start, and a few
decoded samples at each evaluation, so a run can be judged by eye while it trains.

``TextSamples`` runs on every rank (under ZeRO-3 a forward pass needs all ranks) inside the
evaluator's EMA-weights context; only rank 0 decodes and logs. It costs ``eval.text_sample_steps``
network calls on ``eval.num_text_samples`` sequences per evaluation (a glance, not a measurement:
``tools/sample.py`` and ``tools/gen_ppl.py`` are the real thing).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch


def flat_hparams(recipe: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optim.lr": 3e-4, "model.name": "dit", ...}``: the recipe's leaves, lists as text."""
    out: dict[str, Any] = {}
    for key, value in recipe.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flat_hparams(value, name + "."))
        elif value is None or isinstance(value, (bool, int, float, str)):
            out[name] = "null" if value is None else value
        else:
            out[name] = str(value)
    return out


class TextSamples:
    """``(network, step) -> None``: draw ``num_samples`` sequences with ``num_steps`` sampler steps
    (generator seeded by ``seed + step``: the same noise at every evaluation of a run, so the texts
    change only because the weights do) and log them as TensorBoard text ``samples`` on rank 0."""

    def __init__(self, *, sampler: Any, seq_len: int, num_samples: int, num_steps: int, seed: int,
                 decode: Callable[[list[int]], str] | None, log_text: Callable[[str, str, int], None],
                 device: torch.device) -> None:
        self.sampler, self.seq_len = sampler, seq_len
        self.num_samples, self.num_steps, self.seed = num_samples, num_steps, seed
        self.decode, self.log_text, self.device = decode, log_text, device

    @torch.no_grad()
    def __call__(self, network: Callable[..., torch.Tensor], step: int) -> None:
        generator = torch.Generator(device=self.device).manual_seed(self.seed + int(step))
        out = self.sampler.sample(network, self.num_samples, self.seq_len, generator)
        if self.decode is None:  # not rank 0
            return
        blocks = [f"**sample {i}** ({self.num_steps} steps, step {step}):\n\n" + _quote(self.decode(ids))
                  for i, ids in enumerate(out.tokens_BL.cpu().tolist())]
        self.log_text("samples", "\n\n".join(blocks), step)


def _quote(text: str) -> str:
    """Markdown block quote, so the text's own markup (``#``, ``*``) is shown, not rendered as headings."""
    return "\n".join("> " + line.replace("*", "\\*").replace("_", "\\_") for line in (text or "(empty)").split("\n"))


def build_text_samples(cfg: Any, components: Any, log_text: Callable[[str, str, int], None], rank: int,
                       device: torch.device) -> TextSamples | None:
    """``TextSamples`` for a diffusion recipe with a sampler and ``eval.num_text_samples > 0``; else None.

    The recipe's sampler with ``num_steps = eval.text_sample_steps``; the tokenizer is loaded on
    rank 0 only (the others sample and discard)."""
    from udmtrain.train.components import build_sampler

    count = int(getattr(cfg.eval, "num_text_samples", 0) or 0)
    if count <= 0 or cfg.sampler is None or not components.is_diffusion:
        return None
    steps = int(cfg.eval.text_sample_steps)
    sampler_cfg = cfg.sampler.cfg
    if hasattr(sampler_cfg, "num_steps"):
        sampler_cfg = dataclasses.replace(sampler_cfg, num_steps=steps)
    sampler = build_sampler(dataclasses.replace(cfg.sampler, cfg=sampler_cfg), components)
    decode = None
    if rank == 0:
        from udmtrain.data.tokenizers import load_tokenizer

        decode = load_tokenizer(cfg.tokenizer).decode
    return TextSamples(sampler=sampler, seq_len=int(cfg.data.seq_len), num_samples=count, num_steps=steps,
                       seed=int(cfg.run.seed), decode=decode, log_text=log_text, device=device)
