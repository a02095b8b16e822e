"""Checkpoint faults: a pickled payload planted in a checkpoint never runs (docs/security.md).

The payload is an object whose ``__reduce__`` makes any unpickler call ``os.system("touch MARKER")``;
it is planted in ``rank0_state.pt`` (read by udmtrain) and in DeepSpeed's model-states file (read by
DeepSpeed's own loader). Every consumer must refuse the file, name it, exit 2, and the marker must
never appear.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from fault_helpers import TINY, assert_refused, call, run



class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def step_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()


def plant(path: Path, marker: Path) -> None:
    state = torch.load(path, map_location="cpu", weights_only=False)  # our own fixture: trusted
    state["payload"] = Payload(marker)
    torch.save(state, path)


def target_file(run_dir: Path, where: str) -> Path:
    if where == "rank_state":
        return step_dir(run_dir) / "rank0_state.pt"
    return Path(sorted(glob.glob(str(step_dir(run_dir) / "ds" / "*model_states.pt")))[0])


CASES = [  # (tool, arguments after the checkpoint, which file it reads)
    ("inspect_ckpt", [], "rank_state"), ("inspect_ckpt", [], "deepspeed"),
    ("sample", ["--num-samples", "1", "--steps", "2"], "rank_state"),
    ("sample", ["--num-samples", "1", "--steps", "2", "--no-ema"], "deepspeed"),
    ("eval_ppl", ["--max-batches", "1"], "rank_state"),
    ("eval_ppl", ["--max-batches", "1", "--no-ema"], "deepspeed"),
    ("export_ckpt", [], "rank_state"), ("export_ckpt", ["--no-ema"], "deepspeed"),
]


@pytest.mark.parametrize("name,args,where", CASES, ids=[f"{c[0]}-{c[2]}{'-raw' if '--no-ema' in c[1] else ''}"
                                                       for c in CASES])
def test_planted_payload_is_refused_by_tools(run_copy: Path, tmp_path: Path, capsys, name, args, where) -> None:
    marker = tmp_path / "MARKER"
    victim = target_file(run_copy, where)
    plant(victim, marker)
    if name == "export_ckpt":
        argv = [str(run_copy), "--out", str(tmp_path / "export"), *args]
    elif name == "inspect_ckpt":
        argv = [str(run_copy), *args]
    else:
        argv = ["--ckpt", str(run_copy), *args]
    code, out = call(name, argv, capsys)
    assert not marker.exists(), "the planted payload ran"
    assert_refused(code, out, victim.name, "refused")
    assert not (tmp_path / "export").exists() and not (run_copy / "samples").exists()


@pytest.mark.parametrize("where", ["rank_state", "deepspeed"])
def test_planted_payload_is_refused_on_resume(run_copy: Path, tmp_path: Path, where: str) -> None:
    marker = tmp_path / "MARKER"
    victim = target_file(run_copy, where)
    plant(victim, marker)
    before = sorted(p.name for p in (run_copy / "checkpoints").iterdir())
    proc = run(["launch/pretrain.py", "--recipe", str(step_dir(run_copy) / "recipe.yaml"), *TINY,
                f"run.output_root={run_copy.parent}", "train.max_steps=3", "checkpoint.resume=auto"])
    assert not marker.exists(), "the planted payload ran"
    assert_refused(proc.returncode, proc.stdout + proc.stderr, victim.name, "refused")
    assert sorted(p.name for p in (run_copy / "checkpoints").iterdir()) == before  # nothing new written


def test_checkpoint_state_loads_weights_only(trained_run: Path) -> None:
    """What the Checkpointer writes needs no pickle: plain torch.load(weights_only=True) reads it."""
    state = torch.load(step_dir(trained_run) / "rank0_state.pt", weights_only=True)
    assert isinstance(state["rng"]["numpy"][1], list) and state["ema"]["shadow"]


def test_old_checkpoint_with_numpy_rng_state_still_loads(run_copy: Path, capsys) -> None:
    """Written before the RNG state became plain lists: NumPy arrays load safely, restore works."""
    from udmtrain.train.checkpoint import load_rank_state
    from udmtrain.utils.rng import restore_rng_state

    path = step_dir(run_copy) / "rank0_state.pt"
    state = torch.load(path, weights_only=True)
    state["rng"]["numpy"] = np.random.get_state()  # the old format: a tuple with a uint32 ndarray
    torch.save(state, path)
    expected = np.random.random(3)
    restore_rng_state(load_rank_state(step_dir(run_copy), 0)["rng"])
    assert np.array_equal(np.random.random(3), expected)
    code, out = call("inspect_ckpt", [str(run_copy)], capsys)
    assert code == 0, out


def test_eval_ppl_refuses_a_shard_outside_the_manifest(trained_run: Path, data_copy: Path, capsys) -> None:
    import shutil

    shutil.copy(data_copy / "valid-000000.tar", data_copy / "valid-999999.tar")
    code, out = call("eval_ppl", ["--ckpt", str(trained_run), "--data", str(data_copy)], capsys)
    assert_refused(code, out, "valid-999999.tar", "not listed")


def test_kill_9_mid_run_then_resume_is_bit_exact(trained_run: Path, tiny_data: Path, tmp_path: Path) -> None:
    """SIGKILL right after the first checkpoint (mid-step or mid-save), then resume: the final weights
    equal the uninterrupted run's bit for bit."""
    import signal
    import subprocess
    import sys
    import time

    from fault_helpers import REPO, data_overrides, env

    from udmtrain.engine.deepspeed_engine import load_fp32_state_dict

    args = [sys.executable, "launch/pretrain.py", "--recipe", "recipes/quickstart.yaml", "run.name=base",
            f"run.output_root={tmp_path}", *TINY, *data_overrides(tiny_data), "train.max_steps=2",
            "engine.zero_stage=1", "checkpoint.every=1"]
    proc = subprocess.Popen(args, cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = tmp_path / "base" / "checkpoints" / "latest"
    deadline = time.monotonic() + 240
    while not latest.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run ended before the kill: nothing was tested"
    resumed = run(args[1:])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    want, got = load_fp32_state_dict(step_dir(trained_run)), load_fp32_state_dict(step_dir(tmp_path / "base"))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


@pytest.mark.parametrize("change,culprit", [(["engine.zero_stage=3"], "engine.zero_stage=3"),
                                            (["engine.precision=bf16"], "engine.precision=bf16")])
def test_resume_with_another_optimizer_state_layout_is_refused_before_deepspeed(
        run_copy: Path, tiny_data: Path, capsys, change: list[str], culprit: str) -> None:
    """The trained run is ZeRO-1 fp32. Resuming it at ZeRO-3 or bf16 used to die inside DeepSpeed's loader
    with a traceback; now the dry run and the launch both refuse it in one line naming the saved values."""
    from fault_helpers import data_overrides
    from test_recipe_faults import pretrain_main

    argv = ["--recipe", "recipes/quickstart.yaml", "run.name=base", f"run.output_root={run_copy.parent}",
            *TINY, *data_overrides(tiny_data), "engine.zero_stage=1", "train.max_steps=4", "checkpoint.every=1000"]
    before = sorted(p.name for p in (run_copy / "checkpoints").iterdir())
    code, out = pretrain_main([*argv, "--dry-run"], capsys)
    assert code == 0 and f"#   resume: {run_copy / 'checkpoints' / 'step_0000000002'} (step 2)" in out, out[-2000:]
    for extra in (["--dry-run"], []):
        code, out = pretrain_main([*argv, *change, *extra], capsys)
        line = assert_refused(code, out, culprit, "engine.zero_stage=1 engine.precision=fp32", "another run.name")
        assert "step_0000000002" in line and " on cpu |" not in out  # refused before the run is built
    assert sorted(p.name for p in (run_copy / "checkpoints").iterdir()) == before


def _resume_argv(run_copy: Path, tiny_data: Path, *extra: str) -> list[str]:
    from fault_helpers import data_overrides

    return ["--recipe", "recipes/quickstart.yaml", "run.name=base", f"run.output_root={run_copy.parent}", *TINY,
            *data_overrides(tiny_data), "engine.zero_stage=1", "train.max_steps=4", "checkpoint.every=1000", *extra]


@pytest.mark.parametrize("name,damage", [("meta.json", '{"step": 2, "world'), ("recipe.yaml", "model: [\n")])
def test_damaged_checkpoint_file_is_one_line_for_launch_dry_run_and_tools(
        run_copy: Path, tiny_data: Path, capsys, name: str, damage: str) -> None:
    """A truncated meta.json or recipe.yaml was a JSONDecodeError / ParserError traceback from the dry run,
    the launch and every tool; now one line naming the file and the way out."""
    from test_recipe_faults import pretrain_main

    (step_dir(run_copy) / name).write_text(damage)
    for extra in (["--dry-run"], []):
        code, out = pretrain_main(_resume_argv(run_copy, tiny_data, *extra), capsys)
        assert_refused(code, out, str(step_dir(run_copy) / name), "damaged", "another run.name")
    if name == "meta.json":  # the tools read meta.json first (a damaged recipe.yaml is a recipe report there)
        code, out = call("sample", ["--ckpt", str(run_copy), "--num-samples", "1", "--steps", "2"], capsys)
        assert_refused(code, out, str(step_dir(run_copy) / name), "damaged")


def test_fresh_run_over_an_existing_run_is_refused(run_copy: Path, tiny_data: Path, capsys) -> None:
    """checkpoint.resume=never in a run directory with checkpoints used to interleave two runs: the new run's
    step_1, step_2 overwrote the old ones, keep_last pruned across both, metrics.jsonl read 1,2,3,4,1,2."""
    from test_recipe_faults import pretrain_main

    before = sorted(p.name for p in (run_copy / "checkpoints").iterdir())
    for extra in (["--dry-run"], []):
        code, out = pretrain_main(_resume_argv(run_copy, tiny_data, "checkpoint.resume=never", *extra), capsys)
        assert_refused(code, out, "checkpoint.resume=never", str(run_copy), "step_0000000002", "new run.name")
    assert sorted(p.name for p in (run_copy / "checkpoints").iterdir()) == before


def test_tokenizer_replaced_at_the_same_path_is_refused(run_copy: Path, tmp_path: Path, capsys) -> None:
    """The recipe names the tokenizer by path; a file retrained there (same V) decoded samples into other text
    without a word. The checkpoint records the tokenizer's sha256 and the tools compare it."""
    from fault_helpers import VOCAB_SIZE, tool

    from udmtrain.train.checkpoint import CheckpointError, check_resume_target, read_meta

    other = tmp_path / "other.model"
    assert tool("train_tokenizer").main(["--source", "demo", "--vocab-size", str(VOCAB_SIZE), "--model-type",
                                         "unigram", "--out", str(other)]) == 0
    code, out = call("sample", ["--ckpt", str(run_copy), "--num-samples", "1", "--steps", "2",
                                f"tokenizer.path={other}"], capsys)
    assert_refused(code, out, "another tokenizer", str(other), "sha256")
    meta = read_meta(step_dir(run_copy))
    assert meta["vocab_size"] == VOCAB_SIZE and len(meta["tokenizer_sha256"]) == 64
    with pytest.raises(CheckpointError, match="tokenizer_sha256 .* -> 'f00'.*Point tokenizer.path"):
        check_resume_target(step_dir(run_copy), None, None, {"vocab_size": VOCAB_SIZE, "tokenizer_sha256": "f00"})
    with pytest.raises(CheckpointError, match=f"vocab_size {VOCAB_SIZE} -> 512"):
        check_resume_target(step_dir(run_copy), None, None, {"vocab_size": 512, "tokenizer_sha256": None})


def test_inspect_ckpt_on_an_export_says_what_it_is(trained_run: Path, tmp_path: Path, capsys) -> None:
    """It said '<export>/rank0_state.pt does not exist; the checkpoint is incomplete'."""
    out_dir = tmp_path / "export"
    code, out = call("export_ckpt", [str(trained_run), "--out", str(out_dir)], capsys)
    assert code == 0, out
    code, out = call("inspect_ckpt", [str(out_dir)], capsys)
    assert_refused(code, out, str(out_dir), "is an export of tools/export_ckpt.py", f"--ckpt {out_dir}")


def test_foreign_train_state_is_named_not_taken_for_a_run_without_ema(run_copy: Path, capsys) -> None:
    """A model state dict in rank0_state.pt made the tools say 'holds no EMA weights (train.ema_decay was 0)'."""
    path = step_dir(run_copy) / "rank0_state.pt"
    torch.save({"embedding.weight": torch.zeros(4, 2)}, path)
    code, out = call("sample", ["--ckpt", str(run_copy), "--num-samples", "1", "--steps", "2"], capsys)
    line = assert_refused(code, out, str(path), "not a udmtrain train state")
    assert "ema_decay" not in line


def test_second_run_in_a_run_directory_in_use_is_refused(run_copy: Path, tiny_data: Path, capsys) -> None:
    """Two runs of one run.name (e.g. started twice on other ports) would overwrite each other's checkpoints and
    interleave metrics.jsonl; the run holding the directory's lock (here: this test) keeps it."""
    from test_recipe_faults import pretrain_main

    from udmtrain.utils.io import lock_directory

    before = sorted(p.name for p in (run_copy / "checkpoints").iterdir())
    held = lock_directory(run_copy)
    try:
        code, out = pretrain_main(_resume_argv(run_copy, tiny_data), capsys)
    finally:
        held.close()
    assert_refused(code, out, f"run directory {run_copy} is in use", f"pid {os.getpid()}", "another run.name")
    assert sorted(p.name for p in (run_copy / "checkpoints").iterdir()) == before
    again = lock_directory(run_copy)  # released by the refused launch, and by this test: free again
    assert again is not None
    again.close()
