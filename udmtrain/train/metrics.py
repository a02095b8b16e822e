"""Metrics: ``metrics.jsonl`` + TensorBoard on rank 0, a console progress line, step timing, MFU.

Machine-readable first (docs/design.md C19): each logged step is one JSON object per line in
``run_dir/metrics.jsonl``, flushed immediately so a crash loses at most the line being written.
Other ranks get a null logger (``log`` does nothing), so the trainer calls it unconditionally.
"""

from __future__ import annotations

import functools
import json
import math
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

import torch

from udmtrain.utils.progress import format_hms

# Dense peak FLOP/s per GPU by (name substring, dtype); vendor datasheets, without sparsity.
_GPU_PEAK: tuple[tuple[str, torch.dtype, float], ...] = (
    ("H200", torch.bfloat16, 989e12), ("H200", torch.float16, 989e12), ("H200", torch.float32, 494.5e12),
    ("H100", torch.bfloat16, 989e12), ("H100", torch.float16, 989e12), ("H100", torch.float32, 494.5e12),
    ("A100", torch.bfloat16, 312e12), ("A100", torch.float16, 312e12), ("A100", torch.float32, 156e12),
)
"""fp32 rows are the TF32 tensor-core peak (what matmuls reach with TF32 allowed)."""


def mfu(flops_per_token: float, tokens_per_s: float, peak_flops: float) -> float:
    """Model FLOPs utilisation ``flops_per_token * tokens_per_s / peak_flops``.

    ``flops_per_token`` is the training cost (forward + backward, ~6N + attention, as returned by
    the model's ``num_flops_per_token``); ``tokens_per_s`` and ``peak_flops`` per device.
    """
    return flops_per_token * tokens_per_s / peak_flops


@functools.lru_cache(maxsize=None)
def measure_peak_flops(device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16,
                       size: int = 1024, repeats: int = 5) -> float:
    """Peak matmul FLOP/s of ``device`` in ``dtype`` (cached per process).

    CUDA devices found in the datasheet table return its dense peak; anything else is measured with
    a ``size^3`` matmul probe: ``2 size^3 / best time`` over ``repeats`` runs after one warm-up. The
    global RNG states are left untouched.
    """
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, dt, peak in _GPU_PEAK:
            if key in name and dt == dtype:
                return peak
    # a private generator: the probe must not move the global RNG (dropout draws from it, and a resumed
    # run has just restored it from the checkpoint)
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, generator=gen).to(dtype)
    b = torch.randn(size, size, device=device, generator=gen).to(dtype)
    best = math.inf
    for i in range(repeats + 1):
        _sync(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        if i:  # the first run is a warm-up (allocation, kernel selection)
            best = min(best, time.perf_counter() - t0)
    return 2.0 * size**3 / best


def slow_bf16_note(bf16_flops: float, fp32_flops: float) -> str | None:
    """A one-line note when bf16 matmuls are slower than fp32 on this device (measured peaks, FLOP/s):
    CPUs without native bf16 units (no AVX512-BF16 / AMX) emulate them, often ~4x slower than fp32."""
    if bf16_flops >= fp32_flops:
        return None
    return (f"note: this machine multiplies bf16 matrices at {bf16_flops / 1e9:.0f} GFLOP/s and fp32 at "
            f"{fp32_flops / 1e9:.0f} GFLOP/s (no native bf16 units), so engine.precision=fp32 (or auto) trains "
            "faster here")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer:
    """Splits step time into named sections: ``with timer("forward"): ...``; ``timer.split()``.

    ``sync=True`` synchronises CUDA at section boundaries, so asynchronous kernels are charged to
    the section that launched them (costs a little throughput; off by default).
    """

    SECTIONS = ("data", "forward", "backward", "optimizer")

    def __init__(self, sync: bool = False) -> None:
        self.sync = sync and torch.cuda.is_available()
        self.totals: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self.sync:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.sync:
                torch.cuda.synchronize()
            self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - t0

    def split(self, reset: bool = True, steps: int = 1) -> dict[str, float]:
        """``{"time/<section>": seconds, "time/step": total}`` accumulated since the last reset, divided
        by ``steps`` (the steps since the last reset: per-step means over a logging window)."""
        out = {f"time/{k}": v / max(1, steps) for k, v in self.totals.items()}
        out["time/step"] = sum(out.values())
        if reset:
            self.totals = {}
        return out


CONSOLE_KEYS = {
    "train/loss": "loss", "train/nll": "nll", "train/grad_norm": "gnorm", "train/lr": "lr",
    "perf/tokens_per_s": "tok/s", "perf/mfu": "mfu", "val/nll": "val_nll", "val/ppl": "val_ppl",
    "data/corrupt_skipped": "corrupt_skipped",
}
"""Metrics shown (under these short names) on the console line; every metric still goes to the files.
The trainer logs ``perf/*`` as means over the logging window, and the line's ``s/it`` is the same
window's ``perf/step_s``, so tok/s and s/it describe the same steps."""


class MetricLogger:
    """Rank-0 metrics sink: ``metrics.jsonl`` (always), TensorBoard scalars, a console line.

    ``log(step, {"loss": 2.3, "lr": 1e-4, ...})`` writes one JSON line ``{"step": s, ...}`` and one
    TensorBoard scalar per key; non-finite values are written to JSONL as null (valid JSON).
    """

    def __init__(self, run_dir: str | Path, rank: int, log_every: int = 1, max_steps: int | None = None,
                 tensorboard: bool = True, console: TextIO | None = sys.stdout) -> None:
        self.run_dir, self.rank = Path(run_dir), rank
        self.log_every, self.max_steps = max(1, int(log_every)), max_steps
        self.active = rank == 0
        self._jsonl = self._tb = None
        self._console = console if self.active else None
        self._t0: float | None = None
        self._s0 = 0
        self._last_line = (0.0, 0)  # (time, step) of the previous console line
        if self.active:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))

    def should_log(self, step: int) -> bool:
        """True every ``log_every`` steps, at step 1 and at ``max_steps``."""
        return step == 1 or step % self.log_every == 0 or (self.max_steps is not None and step == self.max_steps)

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Write ``metrics`` for ``step`` to every backend (rank 0 only)."""
        if not self.active:
            return
        record = {"step": int(step), "time": time.time()}
        for k, v in metrics.items():
            v = float(v.item() if isinstance(v, torch.Tensor) else v)
            record[k] = v if math.isfinite(v) else None
            if self._tb is not None:
                self._tb.add_scalar(k, v, global_step=int(step))
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            self._tb.flush()
        if self._console is not None:
            print(self.progress_line(step, metrics), file=self._console, flush=True)

    def progress_line(self, step: int, metrics: Mapping[str, Any]) -> str:
        """``step 120/1000 (12.0%) | loss 2.3100 | lr 3.00e-04 | tok/s 3,410 | 1.2 s/it | eta 0:17:36``.

        ``s/it`` is ``perf/step_s`` when logged (the window mean, as ``tok/s``), else the wall clock
        since the previous line; the ETA uses the wall clock since the first line (evaluation and
        checkpoint time included)."""
        now = time.perf_counter()
        if self._t0 is None:
            self._t0, self._s0 = now, step
        parts = [f"step {step}" + (f"/{self.max_steps} ({100 * step / self.max_steps:.1f}%)" if self.max_steps else "")]
        shown = {k: v for k, v in metrics.items() if k in CONSOLE_KEYS} or metrics
        for k, v in shown.items():
            v = float(v)
            k = CONSOLE_KEYS.get(k, k)
            if k == "tok/s":
                parts.append(f"{k} {v:,.0f}")
            else:
                parts.append(f"{k} {v:.2e}" if (v != 0 and (abs(v) < 1e-2 or abs(v) >= 1e5)) else f"{k} {v:.4f}")
        last_t, last_s = self._last_line
        sec_per_step = float(metrics["perf/step_s"]) if "perf/step_s" in metrics else (
            (now - last_t) / (step - last_s) if step > last_s else None)
        if sec_per_step is not None:
            parts.append(f"{sec_per_step:.3g} s/it")
        if step > self._s0 and self.max_steps:
            parts.append(f"eta {format_hms((now - self._t0) / (step - self._s0) * max(0, self.max_steps - step))}")
        self._last_line = (now, step)
        return " | ".join(parts)

    def log_text(self, tag: str, text: str, step: int) -> None:
        """A TensorBoard text entry (markdown) under ``tag`` (rank 0; nothing without TensorBoard)."""
        if self._tb is not None:
            self._tb.add_text(tag, text, global_step=int(step))
            self._tb.flush()

    def log_run_start(self, recipe_yaml: str, hparams: Mapping[str, Any], step: int) -> None:
        """The resolved recipe as TensorBoard text and its scalar settings as hparams (rank 0)."""
        if self._tb is None:
            return
        self._tb.add_text("recipe", "```yaml\n" + recipe_yaml + "\n```", global_step=int(step))
        clean = {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in hparams.items()}
        # add_hparams would open a separate run directory; write the summaries into this one.
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        for summary in hparams_summary(clean, {"val/nll": float("nan")}):
            self._tb._get_file_writer().add_summary(summary)
        self._tb.flush()

    def close(self) -> None:
        """Flush and close the files (idempotent)."""
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

