"""Checkpointer with the real DeepSpeed engine (gloo, CPU): exact resume, atomicity, retention, checks."""

import json
import dataclasses

import pytest

from udmtrain.config.schema import EngineSection
import torch
import yaml

import udmtrain.train.checkpoint as ckpt
from udmtrain.engine import deepspeed_engine as dse
from udmtrain.engine.optim import AdamWBuilder, ConstantWarmupLR, build_lr_schedule
from udmtrain.train.checkpoint import (Checkpointer, CheckpointError, check_compatible, check_resume_target,
                                       find_resume)
from udmtrain.train.state import TrainState

RECIPE = {"run": {"name": "t"}, "model": {"name": "mlp", "hidden_size": 16}, "process": {"name": "uniform"},
          "data": {"tokenizer": "gpt2", "seq_len": 8}, "optim": {"name": "adamw", "lr": 1e-2, "betas": (0.9, 0.99)},
          "train": {"max_steps": 6}}


def Eng(**overrides):  # noqa: N802 - reads like the section it builds
    """The real ``engine:`` recipe section with this file's defaults."""
    return dataclasses.replace(EngineSection(zero_stage=2, precision="fp32", micro_batch_size=2, global_batch_size=2), **overrides)


def _engine(init_seed=0):
    torch.manual_seed(init_seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Dropout(0.3), torch.nn.GELU(), torch.nn.Linear(16, 4))
    sched = build_lr_schedule("constant_warmup", ConstantWarmupLR.Config(warmup_steps=3), max_steps=None)
    return dse.create_engine(model, AdamWBuilder(AdamWBuilder.Config(lr=1e-2)), sched, dse.build_ds_config(Eng(), 1))


def _train(engine, state, stop):
    """Steps until ``state.step == stop``; dropout draws from the global torch RNG (restored on resume)."""
    losses = []
    while state.step < stop:
        g = torch.Generator().manual_seed(state.data_cursor.get("pos", 0))
        x, y = torch.randn(2, 8, generator=g), torch.randn(2, 4, generator=g)
        loss = (engine(x) - y).pow(2).mean()
        engine.backward(loss)
        dse.step(engine)
        losses.append(loss.item())
        state.step += 1
        state.tokens_seen += 16
        state.data_cursor = {"pos": state.data_cursor.get("pos", 0) + 1}
    return losses


def test_exact_resume_through_checkpointer(dist_group, tmp_path):
    torch.manual_seed(42)
    straight, st = _engine(), TrainState()
    want = _train(straight, st, 6)
    want_params = dse.full_state_dict(straight.module)

    torch.manual_seed(42)
    first, s1 = _engine(), TrainState(ema={"w": torch.arange(3.0)})
    saver = Checkpointer(tmp_path / "run", every=3, keep_last=2, resume="auto")
    got = _train(first, s1, 3)
    assert saver.should_save(3) and not saver.should_save(4)
    step_dir = saver.save(first, 3, s1, RECIPE, meta={"note": "x"})
    torch.rand(5)  # RNG drawn after the save must not leak into the resumed run

    second, s2 = _engine(init_seed=9), TrainState()
    resumed_from = Checkpointer(tmp_path / "run", every=3, keep_last=2, resume="auto").find_resume()
    assert resumed_from == step_dir == tmp_path / "run" / "checkpoints" / "step_0000000003"
    meta = saver.load(second, resumed_from, s2, recipe_dict=RECIPE)
    assert (s2.step, s2.tokens_seen, s2.data_cursor) == (3, 48, {"pos": 3}) and torch.equal(s2.ema["w"], torch.arange(3.0))
    got += _train(second, s2, 6)
    assert got == want
    params = dse.full_state_dict(second.module)
    assert all(torch.equal(params[k], want_params[k]) for k in want_params)

    assert (meta["step"], meta["world_size"], meta["tokens_seen"], meta["note"], meta["format_version"]) == (3, 1, 48, "x", 1)
    assert yaml.safe_load((step_dir / "recipe.yaml").read_text())["optim"]["betas"] == [0.9, 0.99]
    assert {"ds", "meta.json", "rank0_state.pt", "recipe.yaml"} <= {p.name for p in step_dir.iterdir()}


def test_crash_mid_save_keeps_previous_latest(dist_group, tmp_path, monkeypatch):
    engine, state = _engine(), TrainState()
    saver = Checkpointer(tmp_path, every=1, keep_last=5)
    _train(engine, state, 1)
    saver.save(engine, 1, state, RECIPE)

    def boom(directory, meta):
        assert (directory / "ds").is_dir()  # the shards are written: the crash is after them
        raise RuntimeError("disk full")

    monkeypatch.setattr(ckpt, "_write_meta", boom)
    _train(engine, state, 2)
    with pytest.raises(RuntimeError, match="disk full"):
        saver.save(engine, 2, state, RECIPE)
    monkeypatch.undo()
    cdir = tmp_path / "checkpoints"
    assert (cdir / "latest").read_text().strip() == "step_0000000001"
    assert sorted(p.name for p in cdir.iterdir()) == ["latest", "step_0000000001"]

    # A hard kill (no cleanup) leaves a tmp dir: never resumed from, removed by the next Checkpointer.
    (cdir / "step_0000000002.tmp-4242" / "ds").mkdir(parents=True)
    assert find_resume(cdir, "auto") == cdir / "step_0000000001"
    Checkpointer(tmp_path, every=1, keep_last=5)
    assert not (cdir / "step_0000000002.tmp-4242").exists()


def test_keep_last_prunes_but_never_latest(dist_group, tmp_path):
    engine, state = _engine(), TrainState()
    saver = Checkpointer(tmp_path, every=1, keep_last=2)
    for step in range(1, 5):
        _train(engine, state, step)
        saver.save(engine, step, state, RECIPE)
    cdir = tmp_path / "checkpoints"
    assert sorted(p.name for p in cdir.glob("step_*")) == ["step_0000000003", "step_0000000004"]
    assert (cdir / "latest").read_text().strip() == "step_0000000004"
    (cdir / "latest").write_text("step_0000000003\n")
    saver.keep_last = 1
    assert saver.prune() == []  # step 3 is older than keep_last allows, but latest names it


def test_resume_modes(dist_group, tmp_path):
    cdir = tmp_path / "run" / "checkpoints"
    assert find_resume(cdir, "never") is None and find_resume(cdir, "auto") is None
    engine, state = _engine(), TrainState()
    _train(engine, state, 1)
    step_dir = Checkpointer(tmp_path / "run", every=1, keep_last=1).save(engine, 1, state, RECIPE)
    assert find_resume(cdir, "never") is None
    assert find_resume(cdir, "auto") == step_dir
    assert find_resume(cdir, str(step_dir)) == step_dir
    assert find_resume(cdir, str(tmp_path / "run")) == step_dir  # a run dir resolves through latest
    with pytest.raises(CheckpointError, match="step_0000000099 does not exist"):
        find_resume(cdir, str(cdir / "step_0000000099"))
    (cdir / "step_0000000007").mkdir()
    with pytest.raises(CheckpointError, match="is not a complete udmtrain checkpoint"):
        find_resume(cdir, str(cdir / "step_0000000007"))
    (cdir / "latest").unlink()  # auto falls back to the newest complete checkpoint
    assert find_resume(cdir, "auto") == step_dir


def test_check_compatible_names_architecture_fields():
    changed = json.loads(json.dumps(RECIPE))
    changed["model"]["hidden_size"] = 32
    changed["data"]["seq_len"] = 16
    changed["optim"]["lr"] = 5.0  # training knobs may change
    changed["train"]["max_steps"] = 100
    with pytest.raises(CheckpointError) as err:
        check_compatible(RECIPE, changed)
    text = str(err.value)
    assert "model.hidden_size: saved 16, now 32" in text and "data.seq_len: saved 8, now 16" in text
    assert "optim" not in text and "max_steps" not in text and "another run.name" in text
    check_compatible(RECIPE, {**RECIPE, "optim": {"lr": 1.0}})  # tuples vs lists and knobs: fine
    with pytest.raises(CheckpointError, match="process.name: saved 'uniform', now 'masked'"):
        check_compatible(RECIPE, {**RECIPE, "process": {"name": "masked"}})
    with pytest.raises(CheckpointError, match="saved with world size 2, this run has 4.*same number of processes"):
        check_compatible(RECIPE, RECIPE, saved_world_size=2, world_size=4)


@pytest.mark.parametrize("saved,now,ok", [
    ((0, "fp32"), (0, "fp32"), True), ((1, "fp32"), (2, "fp32"), True), ((2, "bf16"), (1, "bf16"), True),
    ((0, "fp32"), (2, "fp32"), False), ((2, "fp32"), (0, "fp32"), False), ((1, "bf16"), (3, "bf16"), False),
    ((3, "fp32"), (1, "fp32"), False), ((1, "fp32"), (1, "bf16"), False), ((0, "bf16"), (0, "fp32"), False),
])
def test_check_compatible_refuses_another_optimizer_state_layout(saved, now, ok):
    """DeepSpeed stores the optimizer state differently per ZeRO family (0 / 1-2 / 3) and precision: a resume
    across them died in DeepSpeed (missing ``*_optim_states.pt``, ``AssertionError``); now one error with the fix.
    Offloading may change (measured: 2 -> 2 + offload, 3 + offload -> 3 and 2 + offload -> 1 resume)."""
    def recipe(stage, precision, offload):
        return {**RECIPE, "engine": {"zero_stage": stage, "precision": precision, "offload_optimizer": offload}}

    if ok:
        check_compatible(recipe(*saved, False), recipe(*now, True))
        return
    with pytest.raises(CheckpointError) as err:
        check_compatible(recipe(*saved, False), recipe(*now, False), where="ckpt/step_1")
    text = str(err.value)
    assert f"engine.zero_stage={saved[0]} and engine.precision={saved[1]}" in text
    assert f"this run has engine.zero_stage={now[0]} and engine.precision={now[1]}" in text
    assert f"Resume with engine.zero_stage={saved[0]} engine.precision={saved[1]}" in text
    assert "another run.name" in text and text.startswith("ckpt/step_1")


def test_resume_target_of_an_import_says_to_import_again(tmp_path):
    """An imported checkpoint has no training to lose: the advice is to import it with this run's settings."""
    saved = {**RECIPE, "engine": {"zero_stage": 1, "precision": "fp32"}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(json.loads(json.dumps(saved))))
    (tmp_path / "meta.json").write_text(json.dumps({"step": 0, "world_size": 1, "imported_from": {"layout": "x"}}))
    bf16 = {**saved, "engine": {"zero_stage": 1, "precision": "bf16"}}
    with pytest.raises(CheckpointError, match="(?s)engine.precision=fp32.*import it again with this run's --precision"):
        check_resume_target(tmp_path, bf16, 1)
    assert check_resume_target(tmp_path, saved, 1)["step"] == 0


def test_load_refuses_incompatible_recipe(dist_group, tmp_path):
    engine, state = _engine(), TrainState()
    _train(engine, state, 1)
    saver = Checkpointer(tmp_path, every=1, keep_last=1)
    step_dir = saver.save(engine, 1, state, RECIPE)
    with pytest.raises(CheckpointError, match="model.hidden_size: saved 16, now 64"):
        saver.load(engine, step_dir, TrainState(), recipe_dict={**RECIPE, "model": {"name": "mlp", "hidden_size": 64}})
