"""The bare training step ``tools/bench.py train --compare-bare`` measures the full step against.

Bare = the recipe's network and objective, the recipe's plain ``torch.optim.AdamW`` (its lr, betas,
eps, weight decay; torch's fused kernel on CUDA, as the engine's) under the recipe's autocast, with the
same micro-batches, accumulation, loss scaling (``1 / accumulation``), time vector and gradient
clipping as the full step: no DeepSpeed engine, hooks, non-finite veto, cross-rank agreement, EMA,
timers or host syncs beyond the one ``.item()`` a loss report needs. What the full step costs beyond
it is the framework's overhead. Single process only (no data parallelism to compare).
"""

from __future__ import annotations

from typing import Any

import torch


class BareStep:
    """``BareStep(cfg, vocab_size, device)(batches, step) -> tokens``: one bare optimizer step."""

    def __init__(self, cfg: Any, vocab_size: int, device: torch.device) -> None:
        from udmtrain.engine.optim import build_optimizer
        from udmtrain.train.components import NetworkCall, build_components

        torch.manual_seed(cfg.run.seed)
        self.cfg, self.device = cfg, device
        self.components = build_components(cfg, vocab_size, with_sampler=False)
        self.model = self.components.model.to(device).train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(cfg.optim.name, cfg.optim.cfg, device=device)(self.params)
        self.network = NetworkCall(self.model, cfg.engine.precision, device)
        self.micro = cfg.engine.micro_batch_size
        self.accumulation = cfg.engine.global_batch_size // self.micro
        self.clip = float(cfg.engine.grad_clip or 0.0)
        self.time_kind = cfg.train.time_sampling
        self.eps = float(cfg.train.t_min)

    def __call__(self, batches: Any, step: int) -> int:
        """``accumulation`` micro-batches from ``batches``, backward, clip, AdamW step -> valid tokens."""
        from udmtrain.diffusion.time_sampling import sample_times
        from udmtrain.train.step import doc_ids_kwargs

        tokens = torch.zeros((), dtype=torch.long, device=self.device)
        for micro_index in range(self.accumulation):
            batch = next(batches)
            x0_BL = batch["input_ids"].to(self.device, non_blocking=True)
            valid_BL = batch["valid"].to(self.device, non_blocking=True)
            t_B = None
            if self.components.is_diffusion:
                t_B = sample_times(self.time_kind, self.cfg.engine.global_batch_size, step, self.cfg.run.seed,
                                   self.eps, micro_index * self.micro, self.micro).to(self.device)
            gen = torch.Generator(device=self.device).manual_seed(step * 1000 + micro_index)
            out = self.components.objective(self.network, x0_BL, valid_BL, t_B, gen, **doc_ids_kwargs(
                batch, bool(self.cfg.data.document_attention), self.device))
            (out.loss / self.accumulation).backward()
            tokens += out.num_tokens
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return int(tokens.item())



def main(argv: list[str] | None = None) -> int:
    """This module is imported by tools/bench.py, not run: print what it is and the command that uses it
    (exit 0 for --help, else 2)."""
    import sys

    argv = sys.argv[1:] if argv is None else argv
    print(__doc__.strip() + "\n\nIt is a module of tools/bench.py; run it through:\n"
          "    python tools/bench.py train --recipe recipes/quickstart.yaml --compare-bare")
    return 0 if any(a in ("-h", "--help") for a in argv) else 2


if __name__ == "__main__":
    raise SystemExit(main())
