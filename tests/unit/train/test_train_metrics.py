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


def test_console_rate_and_seconds_per_step_describe_the_same_window(tmp_path):
    out = io.StringIO()
    log = MetricLogger(tmp_path, rank=0, log_every=10, max_steps=100, tensorboard=False, console=out)
    log.log(10, {"train/loss": 2.0, "perf/tokens_per_s": 2048.0, "perf/step_s": 2.0})
    log.log(20, {"train/loss": 1.9, "perf/tokens_per_s": 4096.0, "perf/step_s": 1.0})
    log.close()
    first, second = out.getvalue().splitlines()
    assert "tok/s 2,048" in first and "| 2 s/it" in first
    assert "tok/s 4,096" in second and "| 1 s/it" in second  # the window's mean, not cumulative


def test_step_timer_means_over_steps():
    timer = StepTimer()
    timer.totals = {"forward": 3.0, "backward": 6.0}
    assert timer.split(steps=3) == {"time/forward": 1.0, "time/backward": 2.0, "time/step": 3.0}


def test_recipe_hparams_and_text_samples_reach_tensorboard(tmp_path):
    from udmtrain.train.text_samples import flat_hparams

    log = MetricLogger(tmp_path, rank=0, console=None)
    recipe = {"optim": {"name": "adamw", "lr": 3e-4, "betas": [0.9, 0.99]}, "process": None}
    hp = flat_hparams(recipe)
    assert hp == {"optim.name": "adamw", "optim.lr": 3e-4, "optim.betas": "[0.9, 0.99]", "process": "null"}
    log.log_run_start("optim:\n  lr: 0.0003\n", hp, step=0)
    log.log_text("samples", "> hello world", step=5)
    log.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0})
    acc.Reload()
    tags = acc.Tags()["tensors"]
    assert "recipe/text_summary" in tags and "samples/text_summary" in tags
    (event,) = acc.Tensors("samples/text_summary")
    assert event.step == 5 and b"hello world" in event.tensor_proto.string_val[0]
    assert "lr: 0.0003" in acc.Tensors("recipe/text_summary")[0].tensor_proto.string_val[0].decode()
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = acc.PluginTagToContent("hparams")
    assert "_hparams_/session_start_info" in content
    info = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    assert info.session_start_info.hparams["optim.lr"].number_value == pytest.approx(3e-4)


def test_slow_bf16_note_only_when_bf16_is_slower():
    from udmtrain.train.metrics import slow_bf16_note

    assert slow_bf16_note(200e9, 50e9) is None and slow_bf16_note(50e9, 50e9) is None
    note = slow_bf16_note(55e9, 236e9)
    assert note == ("note: this machine multiplies bf16 matrices at 55 GFLOP/s and fp32 at 236 GFLOP/s (no "
                    "native bf16 units), so engine.precision=fp32 (or auto) trains faster here")
