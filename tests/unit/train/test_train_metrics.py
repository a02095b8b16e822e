"""MetricLogger (metrics.jsonl + TensorBoard read back with EventAccumulator), StepTimer, MFU."""

import io
import json
import math

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from udmtrain.train.metrics import MetricLogger, StepTimer, measure_peak_flops, mfu


def test_jsonl_and_tensorboard_round_trip(tmp_path):
    out = io.StringIO()
    log = MetricLogger(tmp_path, rank=0, log_every=10, max_steps=25, console=out)
    assert [s for s in range(1, 26) if log.should_log(s)] == [1, 10, 20, 25]
    log.log(10, {"loss": 2.5, "lr": 3e-4})
    log.log(20, {"loss": 1.25, "lr": torch.tensor(1e-4), "grad_norm": float("nan")})
    log.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in lines] == [(10, 2.5), (20, 1.25)]
    assert lines[1]["lr"] == pytest.approx(1e-4) and lines[1]["grad_norm"] is None
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(10, 2.5), (20, 1.25)]
    assert "step 20/25 (80.0%)" in out.getvalue() and "eta 0:00:00" in out.getvalue()


def test_other_ranks_write_nothing(tmp_path):
    log = MetricLogger(tmp_path / "r1", rank=1, console=io.StringIO())
    log.log(1, {"loss": 1.0})
    log.close()
    assert not (tmp_path / "r1").exists()


def test_step_timer_splits_sections():
    timer = StepTimer()
    for name in StepTimer.SECTIONS:
        with timer(name):
            sum(range(1000))
    split = timer.split()
    assert set(split) == {"time/data", "time/forward", "time/backward", "time/optimizer", "time/step"}
    assert split["time/step"] == pytest.approx(sum(v for k, v in split.items() if k != "time/step"))
    assert timer.split() == {"time/step": 0}


def test_mfu_and_peak_probe():
    assert mfu(6e9, 1e3, 1.2e13) == pytest.approx(0.5)
    peak = measure_peak_flops("cpu", torch.float32, size=128, repeats=2)
    assert math.isfinite(peak) and peak > 1e8
    assert measure_peak_flops("cpu", torch.float32, size=128, repeats=2) == peak  # cached
