"""One optimizer step through the DeepSpeed engine, with a veto for non-finite losses."""

from __future__ import annotations

import types
from typing import Any

import torch

from udmtrain.train.components import Components, NetworkCall
from udmtrain.utils.dist import all_ranks_agree, all_reduce_sum


def _micro_seed(seed: int, step: int, rank: int, micro: int) -> int:
    """A per-(step, rank, micro-batch) seed for the corruption noise: resume-exact without RNG state."""
    return (seed * 1_000_003 + step) * 65_537 + rank * 257 + micro


def make_skippable(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Let the trainer veto one optimizer update (non-finite loss) without touching Adam's state.

    DeepSpeed calls ``optimizer.step()`` on the client optimizer (ZeRO hands it the fp32 partitions);
    with ``optimizer.skip_next = True`` that call returns at once, so neither the weights nor the
    moments nor Adam's step count change, and ``optimizer.vetoed`` tells the LR schedule (see
    ``skip_with_optimizer``) not to advance either — the same as DeepSpeed's own overflow skip.
    """
    inner_step = optimizer.step
    optimizer.skip_next = False
    optimizer.vetoed = False

    def step(self: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        if self.skip_next:
            self.skip_next = False
            self.vetoed = True
            return None
        return inner_step(*args, **kwargs)

    # A bound method, as torch's LR schedulers expect (they wrap ``optimizer.step.__func__``).
    optimizer.step = types.MethodType(step, optimizer)
    return optimizer


def skip_with_optimizer(scheduler: Any, optimizer: torch.optim.Optimizer) -> Any:
    """Make ``scheduler.step()`` a no-op right after ``optimizer`` vetoed its update.

    So a skipped step never moves the LR schedule, whoever skipped it (our veto or, under ZeRO >= 1
    with non-finite gradients, DeepSpeed's overflow check, which skips the scheduler itself).
    """
    inner_step = scheduler.step

    def step(self: Any, *args: Any, **kwargs: Any) -> Any:
        if getattr(optimizer, "vetoed", False):
            optimizer.vetoed = False
            return None
        return inner_step(*args, **kwargs)

    scheduler.step = types.MethodType(step, scheduler)
    return scheduler


def doc_ids_kwargs(batch: Any, enabled: bool, device: torch.device) -> dict:
    """``{"doc_ids_BL": batch["doc_ids"]}`` (on ``device``) when ``enabled``, else ``{}``.

    Passing nothing when off keeps objectives (and wrappers of them) without the keyword working.
    """
    if not enabled:
        return {}
    if "doc_ids" not in batch:
        raise KeyError(f"data.document_attention is true but the batch has no 'doc_ids' (keys: "
                       f"{sorted(batch)}); use shards written by tools/prepare_data.py or set "
                       "data.document_attention=false")
    return {"doc_ids_BL": batch["doc_ids"].to(device, non_blocking=True)}


class TrainStep:
    """One optimizer step: ``accumulation`` micro-batches through the DeepSpeed engine.

    Times: the global stratified vector of step ``step`` (docs/theory.md §3), sliced at
    ``(micro_index * world + rank) * micro_batch``; corruption noise from a generator seeded by
    (seed, step, rank, micro_index). A non-finite loss on any rank vetoes the update on every rank.
    With ``data.document_attention`` the batch's ``doc_ids`` go to the objective as ``doc_ids_BL``.
    """

    def __init__(self, *, engine: Any, objective: Any, components: Components, cfg: Any, rank: int,
                 world_size: int, device: torch.device, timer: Any, optimizer: Any, ema: Any = None) -> None:
        from udmtrain.engine import deepspeed_engine as dse

        self.dse = dse
        self.engine, self.objective, self.components = engine, objective, components
        self.cfg, self.rank, self.world, self.device = cfg, rank, world_size, device
        self.timer, self.ema, self.optimizer = timer, ema, optimizer
        self.micro = cfg.engine.micro_batch_size
        self.global_batch = cfg.engine.global_batch_size
        self.accumulation = self.global_batch // (self.micro * world_size)
        self.doc_attention = bool(cfg.data.document_attention)
        self.network = NetworkCall(engine, cfg.engine.precision, device)
        from udmtrain.diffusion.time_sampling import TIME_SAMPLERS

        self.draw_times = TIME_SAMPLERS[cfg.train.time_sampling]
        self.t_min = cfg.train.t_min

    def _times(self, step: int, micro_index: int) -> torch.Tensor | None:
        if not self.components.is_diffusion:
            return None
        start = (micro_index * self.world + self.rank) * self.micro
        return self.draw_times(self.global_batch, step, self.cfg.run.seed, self.t_min, start,
                               self.micro).to(self.device)

    def __call__(self, batches: Any, step: int):
        from udmtrain.train.trainer import StepResult

        sums = torch.zeros(3, dtype=torch.float64)  # loss_sum, nelbo_sum, tokens
        finite = True
        for micro_index in range(self.accumulation):
            with self.timer("data"):
                batch = next(batches)
                x0_BL = batch["input_ids"].to(self.device, non_blocking=True)
                valid_BL = batch["valid"].to(self.device, non_blocking=True)
                doc_kwargs = doc_ids_kwargs(batch, self.doc_attention, self.device)
                if "prompt" in batch and bool(batch["prompt"].any()):  # clean, unscored conditioning
                    doc_kwargs["prompt_BL"] = batch["prompt"].to(self.device, non_blocking=True)
            gen = torch.Generator(device=self.device)
            gen.manual_seed(_micro_seed(self.cfg.run.seed, step, self.rank, micro_index))
            with self.timer("forward"):
                out = self.objective(self.network, x0_BL, valid_BL, self._times(step, micro_index), gen,
                                     **doc_kwargs)
            finite = finite and bool(torch.isfinite(out.loss).item())
            with self.timer("backward"):
                self.engine.backward(out.loss)
            sums += torch.stack([out.loss_sum.double().cpu(), out.nelbo_sum.double().cpu(),
                                 out.num_tokens.double().cpu()])
            if micro_index == self.accumulation - 1:
                finite = all_ranks_agree(finite)
                self.optimizer.skip_next = not finite
            with self.timer("optimizer"):
                norm = self.dse.step(self.engine)
        if finite and self.ema is not None:
            with self.timer("optimizer"), self.dse.gathered_parameters(self.engine.module):
                self.ema.update(self.engine.module)
        totals = all_reduce_sum(sums)
        tokens = max(totals[2].item(), 1.0)
        return StepResult(loss=totals[0].item() / tokens, nelbo=totals[1].item() / tokens,
                          num_tokens=int(totals[2].item()), skipped=not finite,
                          grad_norm=norm if finite else None, lr=float(self.engine.get_lr()[0]))
