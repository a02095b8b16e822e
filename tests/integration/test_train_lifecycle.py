"""What a run leaves behind and how it stops: TensorBoard + metrics.jsonl, checkpoint layout and
retention, SIGTERM (finish the step, save, exit 0, resume from there), a diverged run (updates vetoed,
exit code 3 after ``train.max_nonfinite_steps``), and a resume under a changed architecture."""

from __future__ import annotations

import json
import math
import re
import shutil

import torch

import train_helpers as th
from conftest import RESUME_1RANK


def test_tensorboard_metrics_and_checkpoint_layout(straight_1rank):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rows = th.metrics(straight_1rank)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # log_every=1
    for r in rows:
        for key in ("train/loss", "train/nll", "train/lr", "train/grad_norm", "perf/tokens_per_s", "perf/mfu",
                    "time/forward", "time/backward", "time/optimizer", "time/data"):
            assert isinstance(r[key], float) and math.isfinite(r[key]), (key, r)
        assert r["perf/tokens_per_s"] > 0 and 0 < r["perf/mfu"] < 1
        assert r["train/tokens_seen"] == r["step"] * 4 * th.SEQ_LEN  # global batch 4, no padding (wrap packing)
    events = list((straight_1rank / "tensorboard").glob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(straight_1rank / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "perf/tokens_per_s", "perf/mfu"} <= tags
    tb_loss = {e.step: e.value for e in acc.Scalars("train/loss")}
    json_loss = th.losses(straight_1rank)
    assert tb_loss.keys() == json_loss.keys()
    assert all(abs(tb_loss[s] - json_loss[s]) <= 1e-6 * abs(json_loss[s]) for s in json_loss)  # TB stores float32
    # checkpoints: step_<10 digits>, saved every step, keep_last=2 pruned the older ones, latest -> newest
    ckpt = straight_1rank / "checkpoints"
    names = sorted(p.name for p in ckpt.iterdir())
    assert names == ["latest", "step_0000000003", "step_0000000004"], names
    assert all(re.fullmatch(r"step_\d{10}", n) for n in names if n != "latest")
    assert (ckpt / "latest").read_text() == "step_0000000004\n"
    meta = json.loads((ckpt / "step_0000000004" / "meta.json").read_text())
    assert (meta["world_size"], meta["step"], meta["run_name"]) == (1, 4, "straight1")
    assert meta["tokens_seen"] == 4 * 4 * th.SEQ_LEN
    assert {"ds", "meta.json", "recipe.yaml", "rank0_state.pt"} <= {p.name for p in (ckpt / "step_0000000004").iterdir()}


def test_sigterm_finishes_the_step_saves_and_resumes(tiny_data, runs_root):
    name = "sigterm"
    run_dir = runs_root / name
    overrides = th.tiny_overrides(tiny_data, runs_root, name, "train.max_steps=100000")
    proc, sent_at = th.run_and_signal("recipes/quickstart.yaml", overrides, after_step=2, run_dir=run_dir)
    assert sent_at is not None, th.describe(proc)
    assert proc.returncode == 0, th.describe(proc)
    last = max(th.losses(run_dir))
    assert last >= sent_at
    assert f"stopping at step {last} on a signal; checkpoint written" in proc.stdout, th.describe(proc)
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{last:010d}"
    assert th.rank_state(th.step_dir(run_dir, last))["step"] == last
    # resume continues from the signal checkpoint
    again = th.run("recipes/quickstart.yaml", th.tiny_overrides(tiny_data, runs_root, name, f"train.max_steps={last + 2}"))
    th.check_ok(again, run_dir, last + 2)
    assert f"resume from {th.step_dir(run_dir, last)} at step {last}" in again.stdout, th.describe(again)
    steps = [r["step"] for r in th.metrics(run_dir)]
    assert steps == list(range(1, last + 3)), steps  # no step logged twice, none missing


def test_nonfinite_loss_vetoes_updates_and_stops_with_exit_3(tiny_data, runs_root):
    """A real divergence: Adam with ``optim.eps=0`` turns the zero gradient of every embedding row
    not seen in step 1 into 0/0 = NaN, so step 2's loss is NaN. ZeRO stage 0 (fp32) has no overflow
    check of its own, so the only veto is TrainStep's ``optimizer.skip_next``: the weights and the
    Adam state after the vetoed step 2 equal those after step 1, and the run stops with exit code 3
    after ``train.max_nonfinite_steps`` consecutive non-finite steps without saving again."""
    name = "nonfinite"
    run_dir = runs_root / name
    proc = th.run("recipes/quickstart.yaml", th.tiny_overrides(
        tiny_data, runs_root, name, "optim.eps=0", "engine.zero_stage=0", "train.max_steps=10",
        "train.max_nonfinite_steps=2", "checkpoint.every=1", "checkpoint.keep_last=5"))
    assert proc.returncode == 3, th.describe(proc)
    assert "stopping: 2 consecutive non-finite losses (train.max_nonfinite_steps=2)" in proc.stdout
    assert "step 2: non-finite loss, update skipped (1 in a row, 1 in total)" in proc.stdout
    losses = th.losses(run_dir)
    assert sorted(losses) == [1, 2, 3] and math.isfinite(losses[1]) and losses[2] is None and losses[3] is None
    assert th.metrics(run_dir)[-1]["train/skipped_steps"] == 2
    # step 2 was saved (cadence) after its vetoed update; step 3 stopped the run before any save
    ckpt = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step_0000000001", "step_0000000002"]
    assert (ckpt / "latest").read_text().strip() == "step_0000000002"
    one, two = th.ds_tensors(th.step_dir(run_dir, 1)), th.ds_tensors(th.step_dir(run_dir, 2))
    assert any(k.endswith("exp_avg_sq") for k in one), sorted(one)[:10]
    assert any(torch.isnan(t).any() for t in one.values())  # the eps=0 update really produced NaN
    _assert_bitwise(one, two, "weights + Adam state after the vetoed step")
    state = th.rank_state(th.step_dir(run_dir, 2))
    assert (state["num_nonfinite"], state["total_skipped"]) == (1, 1)


def _assert_bitwise(a: dict, b: dict, what: str) -> None:
    """Bitwise equality that treats NaN == NaN (same bit pattern)."""
    assert a.keys() == b.keys(), what
    for key in a:
        x, y = a[key], b[key]
        if x.is_floating_point():
            x, y = x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)
        assert torch.equal(x, y), f"{what}: {key}"


def test_architecture_change_on_resume_is_refused_naming_the_field(straight_1rank, tiny_data, tmp_path):
    root = tmp_path / "runs"
    shutil.copytree(straight_1rank, root / straight_1rank.name)  # the shared run stays untouched
    overrides = th.tiny_overrides(tiny_data, root, straight_1rank.name, *RESUME_1RANK, "checkpoint.every=1",
                                  "model.hidden_size=64", "train.max_steps=6")
    proc = th.run("recipes/quickstart.yaml", overrides)
    assert proc.returncode == 2, th.describe(proc)
    assert "model.hidden_size: saved 32, now 64" in proc.stderr, th.describe(proc)
    assert "checkpoint.resume=never" in proc.stderr
    assert "Traceback" not in proc.stderr, th.describe(proc)
    ckpt = root / straight_1rank.name / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step_0000000004"
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step_0000000003", "step_0000000004"]
