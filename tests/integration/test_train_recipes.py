"""Every shipped recipe trains: 2 steps of ``launch/pretrain.py`` with its model family, process, loss
and parameterization kept and only sizes, data and tokenizer shrunk; and a recipe whose corpus was
never prepared stops at once with the command that builds it."""

from __future__ import annotations

import math
import os
import subprocess
import time
from pathlib import Path

import pytest
import torch

import train_helpers as th

RECIPES = sorted(p.name for p in (th.REPO / "recipes").glob("*.yaml"))


def test_every_recipe_is_covered():
    assert {"ar.yaml", "mdlm.yaml", "quickstart.yaml", "absorbing_udm.yaml"} <= set(RECIPES)


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_trains_two_steps(recipe, tiny_data, runs_root):
    from udmtrain.config import load_recipe

    name = f"recipe_{Path(recipe).stem}"
    path = th.REPO / "recipes" / recipe
    probe = load_recipe(str(path), th.tiny_overrides(tiny_data, runs_root, name, dit=False))
    diffusion = probe.process is not None
    overrides = th.tiny_overrides(tiny_data, runs_root, name, "train.max_steps=2", dit=diffusion)
    cfg = load_recipe(str(path), overrides)
    # the recipe's own math is kept
    assert (cfg.model.name, cfg.loss.name) == (probe.model.name, probe.loss.name)
    proc = th.run(path, overrides)
    run_dir = runs_root / name
    th.check_ok(proc, run_dir, 2)
    rows = th.losses(run_dir)
    assert sorted(rows) == [1, 2] and all(math.isfinite(v) for v in rows.values()), rows
    # the network's output width is the process's token space: V + 1 (the mask) for the masked process
    states = torch.load(th.step_dir(run_dir, 2) / "ds" / "mp_rank_00_model_states.pt", map_location="cpu",
                        weights_only=False)
    widths = [shape[0] for group in states["param_shapes"] for shape in group.values() if len(shape) == 2]
    masked = diffusion and cfg.process.name == "masked"
    assert max(widths) == th.VOCAB_SIZE + (1 if masked else 0), (recipe, widths)


def test_missing_corpus_stops_at_once_with_the_prepare_command(tmp_path):
    """``deepspeed launch/pretrain.py --recipe recipes/absorbing_udm.yaml`` without data/owt: exit 2 in
    seconds, before any process group (no rendezvous, no JIT build), naming the command to run."""
    env = th._env()
    env["TORCH_EXTENSIONS_DIR"] = str(tmp_path / "no_prebuilt_ops")  # a JIT build would take ~40 s
    cmd = th.command(th.REPO / "recipes" / "absorbing_udm.yaml", [], launcher="deepspeed", nproc=1)
    t0 = time.monotonic()
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - t0
    assert proc.returncode != 0, th.describe(proc)
    assert "python tools/prepare_data.py --source hf --hf-name openwebtext --tokenizer gpt2 --seq-len 1024 " \
           "--out data/owt" in proc.stderr, th.describe(proc)
    assert "data/owt" in proc.stderr and "manifest" in proc.stderr
    assert "Initializing TorchBackend" not in proc.stdout + proc.stderr  # DeepSpeed's init_distributed line
    jit_dir = tmp_path / "no_prebuilt_ops"
    assert not jit_dir.exists() or not os.listdir(jit_dir), "a DeepSpeed op was JIT-built before the data check"
    assert elapsed < 30, f"took {elapsed:.1f} s"
