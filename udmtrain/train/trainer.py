"""The train loop: short, with every cadence decided by the component that owns it (DESIGN C11).

    trainer = build_trainer(run_config)          # udmtrain/train/build.py wires everything
    trainer.train()

One optimizer step = ``accumulation_steps`` micro-batches on every rank. The time of each sequence
is drawn stratified over the *global* batch from a generator seeded by (seed, step) (SPEC section 3,
bug 10.10), so ranks agree without sharing RNG state and a resumed run draws the same times.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable


from udmtrain.utils.dist import print0


@dataclass
class StepResult:
    """What one optimizer step reports (averaged over the global batch)."""

    loss: float
    nelbo: float
    num_tokens: int
    skipped: bool


class Trainer:
    """Runs ``train_step`` until ``max_steps``; logging, eval and checkpoints decide their cadence.

    Everything is injected (DESIGN C12): ``step_fn(batch_iter, step) -> StepResult`` performs the
    forward/backward/optimizer work of one optimizer step through the engine; ``evaluate(step)``
    returns validation metrics; ``save(step, final)`` writes a checkpoint; ``metrics`` logs;
    ``stop_requested()`` reports a SIGTERM/SIGINT agreed by all ranks.
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
        should_eval: Callable[[int], bool],
        evaluate: Callable[[int], dict],
        should_save: Callable[[int], bool],
        save: Callable[[int], None],
        weights_finite: Callable[[], bool],
        stop_requested: Callable[[], bool],
        timer: Any,
        throughput: Callable[[float, int], dict],
        lr_fn: Callable[[], float],
        grad_norm_fn: Callable[[], float | None],
        exact_nll: bool = False,
    ) -> None:
        self.state = state
        self.max_steps = max_steps
        self.max_nonfinite_steps = max_nonfinite_steps
        self.batches = batches
        self.step_fn = step_fn
        self.metrics = metrics
        self.should_eval, self.evaluate = should_eval, evaluate
        self.should_save, self.save, self.weights_finite = should_save, save, weights_finite
        self.stop_requested = stop_requested
        self.timer, self.throughput = timer, throughput
        self.lr_fn, self.grad_norm_fn = lr_fn, grad_norm_fn
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
            if self.should_eval(state.step):
                self.metrics.log(state.step, self.evaluate(state.step))
            stop = self.stop_requested()
            if stop or self.should_save(state.step) or state.step == self.max_steps:
                if state.num_nonfinite == 0 and self.weights_finite():
                    self.save(state.step)
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
            "train/lr": self.lr_fn(),
            "train/tokens_seen": self.state.tokens_seen,
            "train/skipped_steps": self.state.total_skipped,
        }
        grad_norm = self.grad_norm_fn()
        if grad_norm is not None:
            scalars["train/grad_norm"] = grad_norm
        scalars.update(step_times)
        self.metrics.log(self.state.step, scalars)
