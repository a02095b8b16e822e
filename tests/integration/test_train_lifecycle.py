"""What a run leaves behind and how it stops: TensorBoard + metrics.jsonl, checkpoint layout and
retention, SIGTERM (finish the step, save, exit 0, resume from there), a diverged run (updates vetoed,
exit code 3 after ``train.max_nonfinite_steps``; non-finite weights never checkpointed, ``latest`` stays
on the last good step), and a resume under a changed architecture."""

from __future__ import annotations

import json
import math
import re
import shutil

import pytest

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


def test_ctrl_c_to_the_process_group_with_loader_workers_saves(tiny_data, runs_root):
    """Ctrl-C signals the whole process group (launcher, 2 ranks, their DataLoader workers): a worker that died
    of it made the next batch raise before the run could save (nothing was written). Workers now ignore it."""
    import os
    import signal
    import subprocess
    import time

    name = "ctrl_c_workers"
    run_dir = runs_root / name
    overrides = th.tiny_overrides(tiny_data, runs_root, name, "train.max_steps=100000", "data.num_workers=1")
    proc = subprocess.Popen(th.command("recipes/quickstart.yaml", overrides, "deepspeed", 2), env=th._env(), cwd=th.REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline, sent = time.monotonic() + 180, False
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if (run_dir / "metrics.jsonl").exists() and len(th.metrics(run_dir)) >= 5:
                os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
                sent = True
                break
            time.sleep(0.05)
        out, err = proc.communicate(timeout=120)
    finally:  # never leave the launcher, its ranks or their workers running
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert sent, f"the run never reached step 5:\n{err[-3000:]}"
    result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    assert "on a signal; checkpoint written" in out, th.describe(result)  # (the launcher itself exits 130)
    last = max(th.losses(run_dir))
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{last:010d}"


def test_a_rank_that_cannot_resume_says_so_and_the_job_ends(tiny_data, runs_root):
    """Rank 1's damaged rank1_state.pt: its refusal was never printed (only rank 0 printed) and the job hung in
    the teardown barrier until the launcher's timeout. Now that rank prints it and the job exits 2."""
    name = "rank1_damaged"
    run_dir = runs_root / name
    first = th.run("recipes/quickstart.yaml", th.tiny_overrides(tiny_data, runs_root, name, "train.max_steps=2"),
                   launcher="deepspeed", nproc=2)
    th.check_ok(first, run_dir, 2)
    state = th.step_dir(run_dir, 2) / "rank1_state.pt"
    state.write_bytes(b"garbage")
    again = th.run("recipes/quickstart.yaml", th.tiny_overrides(tiny_data, runs_root, name, "train.max_steps=4"),
                   launcher="deepspeed", nproc=2, timeout=150)
    assert again.returncode != 0, th.describe(again)
    assert f"udmtrain: rank 1: {state}" in again.stderr + again.stdout, th.describe(again)


NO_CHECKPOINT = ("the weights or the loss are not finite, so no checkpoint is written and the last good one "
                 "stays `latest`")


def _nonfinite_run(tiny_data, runs_root, name: str, *extra: str):
    """A 1-process quickstart run that diverges for real: Adam with ``optim.eps=0`` divides the zero
    first and second moments of every parameter entry without gradient in step 1 (embedding rows of
    unseen tokens, ...) as 0/0 = NaN, so step 1's loss is finite but its update makes weights NaN.
    ZeRO stage 0 in fp32 has no overflow check of its own."""
    proc = th.run("recipes/quickstart.yaml", th.tiny_overrides(
        tiny_data, runs_root, name, "optim.eps=0", "engine.zero_stage=0", "train.max_steps=10", *extra))
    return proc, runs_root / name


def test_nan_weights_are_never_checkpointed(tiny_data, runs_root):
    """The save due at step 1 finds NaN weights: nothing is written and the run stops with exit 3."""
    proc, run_dir = _nonfinite_run(tiny_data, runs_root, "nan_weights", "checkpoint.every=1",
                                   "train.max_nonfinite_steps=5")
    assert proc.returncode == 3, th.describe(proc)
    assert f"stopping at step 1: {NO_CHECKPOINT}" in proc.stdout, th.describe(proc)
    assert "non-finite loss, update skipped" not in proc.stdout  # the loss of step 1 itself was finite
    losses = th.losses(run_dir)
    assert sorted(losses) == [1] and math.isfinite(losses[1])
    assert th.metrics(run_dir)[-1]["train/skipped_steps"] == 0
    assert not (run_dir / "checkpoints").exists(), sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def test_nonfinite_loss_vetoes_updates_and_stops_with_exit_3(tiny_data, runs_root):
    """No save is due (checkpoint.every=100): the NaN weights of step 1 give NaN losses at steps 2
    and 3, both updates are vetoed, and ``train.max_nonfinite_steps=2`` stops the run at step 3."""
    proc, run_dir = _nonfinite_run(tiny_data, runs_root, "nan_losses", "checkpoint.every=100",
                                   "train.max_nonfinite_steps=2")
    assert proc.returncode == 3, th.describe(proc)
    assert "step 2: non-finite loss, update skipped (1 in a row, 1 in total)" in proc.stdout, th.describe(proc)
    assert "step 3: non-finite loss, update skipped (2 in a row, 2 in total)" in proc.stdout
    assert "stopping: 2 consecutive non-finite losses (train.max_nonfinite_steps=2)" in proc.stdout
    assert "step 4" not in proc.stdout
    losses = th.losses(run_dir)
    assert sorted(losses) == [1, 2, 3] and math.isfinite(losses[1]), losses
    assert all(losses[s] is None or math.isnan(losses[s]) for s in (2, 3)), losses  # JSON null or NaN
    assert th.metrics(run_dir)[-1]["train/skipped_steps"] == 2
    assert not (run_dir / "checkpoints").exists()


def test_last_good_checkpoint_stays_latest_after_a_divergence(tiny_data, runs_root):
    """A run whose weights blow up after a few good steps: AdamW's decoupled decay with
    ``optim.weight_decay=1e6`` multiplies every weight by ``1 - lr * 1e6`` (-499, then -999) per step.
    Every good step is saved (checkpoint.every=1); at the first step whose loss or weights are not
    finite the run stops with exit 3 and ``latest`` still names the step before, with finite weights.
    (An ``optim.eps=0`` override on resume would not do: the optimizer's hyperparameters are restored
    from the checkpoint.)"""
    name = "diverge_late"
    run_dir = runs_root / name
    proc = th.run("recipes/quickstart.yaml", th.tiny_overrides(
        tiny_data, runs_root, name, "optim.weight_decay=1e6", "engine.zero_stage=0", "train.max_steps=40",
        "train.max_nonfinite_steps=5", "checkpoint.every=1", "checkpoint.keep_last=0"))
    assert proc.returncode == 3, th.describe(proc)
    stops = re.findall(r"stopping at step (\d+): " + re.escape(NO_CHECKPOINT), proc.stdout)
    assert len(stops) == 1, th.describe(proc)
    bad = int(stops[0])
    assert 1 < bad < 40, th.describe(proc)  # a good checkpoint first (step 3 today), then a real divergence
    assert max(th.losses(run_dir)) == bad
    ckpt = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest"] + [f"step_{s:010d}" for s in range(1, bad)]
    assert (ckpt / "latest").read_text() == f"step_{bad - 1:010d}\n"
    last_good = th.step_dir(run_dir, bad - 1)
    tensors = th.ds_tensors(last_good)
    weights = [k for k in tensors if "module" in k and tensors[k].is_floating_point()]
    assert any(k.endswith("exp_avg_sq") for k in tensors) and weights, sorted(tensors)[:10]
    assert all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())
    state = th.rank_state(last_good)
    assert (state["step"], state["num_nonfinite"]) == (bad - 1, 0)


def test_architecture_change_on_resume_is_refused_naming_the_field(straight_1rank, tiny_data, tmp_path):
    root = tmp_path / "runs"
    shutil.copytree(straight_1rank, root / straight_1rank.name)  # the shared run stays untouched
    overrides = th.tiny_overrides(tiny_data, root, straight_1rank.name, *RESUME_1RANK, "checkpoint.every=1",
                                  "model.hidden_size=64", "train.max_steps=6")
    proc = th.run("recipes/quickstart.yaml", overrides)
    assert proc.returncode == 2, th.describe(proc)
    assert "model.hidden_size: saved 32, now 64" in proc.stderr, th.describe(proc)
    assert "start a new run under another run.name" in proc.stderr
    assert "Traceback" not in proc.stderr, th.describe(proc)
    ckpt = root / straight_1rank.name / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step_0000000004"
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step_0000000003", "step_0000000004"]


def test_resume_applies_the_current_recipes_optimizer_settings(straight_1rank, tiny_data, tmp_path):
    """``optim.*`` may change on resume (lower the LR after a spike): the new peak LR and AdamW
    settings apply, although the checkpoint restores the optimizer's saved param groups."""
    root = tmp_path / "runs"
    shutil.copytree(straight_1rank, root / straight_1rank.name)
    before = th.metrics(root / straight_1rank.name)[-1]["train/lr"]
    overrides = th.tiny_overrides(tiny_data, root, straight_1rank.name, *RESUME_1RANK, "train.max_steps=6",
                                  f"optim.lr={before / 4}", "optim.weight_decay=0.5")
    proc = th.run("recipes/quickstart.yaml", overrides)
    assert proc.returncode == 0, th.describe(proc)
    assert "resume from" in proc.stdout, th.describe(proc)
    after = th.metrics(root / straight_1rank.name)[-1]
    assert after["step"] == 6 and after["train/lr"] == pytest.approx(before / 4, rel=1e-12)
    groups = torch.load(th.step_dir(root / straight_1rank.name, 6) / "ds" / "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                        map_location="cpu", weights_only=False)["optimizer_state_dict"]
    saved = groups["base_optimizer_state"]["param_groups"] if "base_optimizer_state" in groups else groups["param_groups"]
    assert all(g["weight_decay"] == 0.5 for g in saved)
