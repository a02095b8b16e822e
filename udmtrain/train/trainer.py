"""The train loop: short, with every cadence decided by the component that owns it (docs/design.md C11).

    trainer = build_trainer(run_config)          # udmtrain/train/build.py wires everything
    trainer.train()

One optimizer step = ``accumulation_steps`` micro-batches on every rank. The time of each sequence
is drawn stratified over the *global* batch from a generator seeded by (seed, step) (docs/theory.md §3,
bug 10.10), so ranks agree without sharing RNG state and a resumed run draws the same times.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from udmtrain.utils.dist import print0


@dataclass
class StepResult:
    """What one optimizer step reports (averaged over the global batch)."""

    loss: float
    nelbo: float
    num_tokens: int
    skipped: bool
    grad_norm: float | None = None
    """Global gradient norm before clipping; None when the update was skipped."""
    lr: float = 0.0
    """Learning rate the schedule gives the next step."""


class TrainCheckpointer:
    """The trainer's checkpointer: decides the cadence and writes everything a bit-exact resume needs.

    ``checkpointer`` (``udmtrain.train.checkpoint.Checkpointer``) writes the engine shards and the
    ``TrainState``; this adds the data cursor and the EMA to the state first, and checks the weights.
    """

    def __init__(self, checkpointer: Any, engine: Any, state: Any, loader: Any, ema: Any, recipe: dict,
                 meta: dict) -> None:
        self.checkpointer, self.engine, self.state, self.loader, self.ema = checkpointer, engine, state, loader, ema
        self.recipe, self.meta = recipe, meta

    def should_save(self, step: int) -> bool:
        return self.checkpointer.should_save(step)

    def weights_finite(self) -> bool:
        """True on every rank iff every rank's weights (ZeRO-3: its partition) are finite."""
        from udmtrain.utils.dist import all_ranks_agree

        local = all(bool(torch.isfinite(getattr(p, "ds_tensor", p)).all()) for p in self.engine.module.parameters())
        return all_ranks_agree(local)

    def save(self, step: int) -> None:
        self.state.data_cursor = self.loader.state_dict()
        self.state.ema = self.ema.state_dict() if self.ema is not None else None
        self.checkpointer.save(self.engine, step, self.state, self.recipe, self.meta)


class Trainer:
    """Runs ``train_step`` until ``max_steps``; logging, eval and checkpoints decide their cadence.

    ``step_fn(batch_iter, step) -> StepResult`` performs the forward/backward/optimizer work of one
    optimizer step through the engine; ``evaluator`` (``should_eval(step)``, ``evaluator(step) ->
    metrics``) and ``checkpointer`` (``TrainCheckpointer``) decide their own cadence; ``metrics`` logs;
    ``signals.should_exit()`` reports a SIGTERM/SIGINT agreed by all ranks; ``throughput(seconds,
    tokens)`` turns a step's time into the perf scalars.
    """

    def __init__(
        self,
        *,
        state: Any,
        max_steps: int,
        max_nonfinite_steps: int,
        batches: Any,
        step_fn: Callable[[Any, int], StepResult],
        metrics: Any,
        evaluator: Any,
        checkpointer: TrainCheckpointer,
        signals: Any,
        timer: Any,
        throughput: Callable[[float, int], dict],
        exact_nll: bool = False,
    ) -> None:
        self.state = state
        self.max_steps = max_steps
        self.max_nonfinite_steps = max_nonfinite_steps
        self.batches = batches
        self.step_fn = step_fn
        self.metrics = metrics
        self.evaluator, self.checkpointer, self.signals = evaluator, checkpointer, signals
        self.timer, self.throughput = timer, throughput
        # exp(train/nll) is a perplexity bound for diffusion, the exact perplexity for the AR model.
        self.ppl_key = "train/ppl" if exact_nll else "train/ppl_bound"

    def train(self) -> str:
        """Train to ``max_steps``; returns why it stopped: 'done', 'signal' or 'nonfinite'."""
        state = self.state
        reason = "done"
        window = [0.0, 0, 0]  # seconds, tokens, steps since the last logged step: perf/* are window means
        while state.step < self.max_steps:
            t0 = time.perf_counter()
            result = self.step_fn(self.batches, state.step)
            state.step += 1
            state.tokens_seen += result.num_tokens
            if result.skipped:
                state.num_nonfinite += 1
                state.total_skipped += 1
                print0(f"step {state.step}: non-finite loss, update skipped "
                       f"({state.num_nonfinite} in a row, {state.total_skipped} in total)")
            else:
                state.num_nonfinite = 0
            window = [window[0] + time.perf_counter() - t0, window[1] + result.num_tokens, window[2] + 1]
            if self.metrics.should_log(state.step) or state.step == self.max_steps:
                step_times = self.timer.split(steps=window[2])
                step_times.update(self.throughput(window[0] / window[2], window[1] / window[2]))
                self._log(result, step_times)
                window = [0.0, 0, 0]
            if state.num_nonfinite >= self.max_nonfinite_steps:
                reason = "nonfinite"
                print0(f"stopping: {state.num_nonfinite} consecutive non-finite losses "
                       f"(train.max_nonfinite_steps={self.max_nonfinite_steps}); the last good "
                       "checkpoint is left intact. Lower optim.lr or check the data.")
                break
            if self.evaluator.should_eval(state.step):
                self.metrics.log(state.step, self.evaluator(state.step))
            stop = self.signals.should_exit()
            if stop or self.checkpointer.should_save(state.step) or state.step == self.max_steps:
                if state.num_nonfinite == 0 and self.checkpointer.weights_finite():
                    self.checkpointer.save(state.step)
                else:  # never let `latest` point at diverging or NaN weights
                    reason = "nonfinite"
                    print0(f"stopping at step {state.step}: the weights or the loss are not finite, so no "
                           "checkpoint is written and the last good one stays `latest`. Lower optim.lr, "
                           "raise optim.eps or check the data.")
                    break
            if stop:
                reason = "signal"
                print0(f"stopping at step {state.step} on a signal; checkpoint written")
                break
        return reason

    def _log(self, result: StepResult, step_times: dict) -> None:
        scalars = {
            "train/loss": result.loss,
            "train/nll": result.nelbo,
            self.ppl_key: math.exp(min(result.nelbo, 50.0)),
            "train/lr": result.lr,
            "train/tokens_seen": self.state.tokens_seen,
            "train/skipped_steps": self.state.total_skipped,
        }
        corrupt = getattr(self.batches, "num_corrupt", 0)
        if corrupt:  # data.on_corrupt=skip: what this rank's loader skipped so far (console, JSONL, TensorBoard)
            scalars["data/corrupt_skipped"] = corrupt
        if result.grad_norm is not None:
            scalars["train/grad_norm"] = result.grad_norm
        scalars.update(step_times)
        self.metrics.log(self.state.step, scalars)
