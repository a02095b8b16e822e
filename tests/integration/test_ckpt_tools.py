"""``tools/inspect_ckpt.py`` and ``tools/export_ckpt.py`` end to end on a real 4-step AUDM run (CPU).

Once per module: the tiny demo corpus (``tiny_data`` in conftest.py: the real train_tokenizer.py and
prepare_data.py, V=400, seq_len 32) and a 4-step quickstart run through ``launch/pretrain.py`` with a
checkpoint every 2 steps (keep_last 2: steps 2 and 4 remain). Both tools run as subprocesses, as a
user runs them; their outputs are checked against the checkpoint files and ``load_for_inference``.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_helpers as th

STEP = 4
SHIFT = 2  # checkpoint.every


@pytest.fixture(scope="module")
def run_dir(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ckpt_tools_runs")
    proc = th.run("recipes/quickstart.yaml", th.tiny_overrides(
        tiny_data, root, "x", f"train.max_steps={STEP}", f"checkpoint.every={SHIFT}"))
    th.check_ok(proc, root / "x", STEP)
    return root / "x"


def tool(name: str, *args: object) -> subprocess.CompletedProcess:
    env = th._env()
    env.pop("UDMTRAIN_DEBUG", None)
    return subprocess.run([sys.executable, str(th.REPO / "tools" / name), *map(str, args)], cwd=th.REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, th.describe(proc)
    return proc


@pytest.fixture(scope="module")
def loaded_ema(run_dir: Path):
    from udmtrain.train.inference import load_for_inference

    return load_for_inference(run_dir, use_ema=True)


@pytest.fixture(scope="module")
def export_dir(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("exports") / "ema"
    ok(tool("export_ckpt.py", run_dir, "--out", out))
    return out


def test_inspect_json_lists_checkpoints_and_counters(run_dir: Path, loaded_ema) -> None:
    report = json.loads(ok(tool("inspect_ckpt.py", run_dir, "--json")).stdout)
    rows = report["checkpoints"]
    assert [r["step"] for r in rows] == [SHIFT, STEP]
    assert report["latest"] == f"step_{STEP:010d}" and [r["latest"] for r in rows] == [False, True]
    for r in rows:
        meta = json.loads((th.step_dir(run_dir, r["step"]) / "meta.json").read_text())
        assert r["tokens_seen"] == meta["tokens_seen"] > 0
        on_disk = sum(p.stat().st_size for p in th.step_dir(run_dir, r["step"]).rglob("*") if p.is_file())
        assert r["bytes"] == on_disk
    chosen = report["chosen"]
    assert Path(chosen["path"]) == th.step_dir(run_dir, STEP)
    # the meta-device count equals the real model's (built on CPU with the checkpoint's weights)
    assert chosen["parameters"]["num_parameters"] == sum(p.numel() for p in loaded_ema.model.parameters())
    assert chosen["parameters"]["source"] == "recipe (meta device)"
    state = th.rank_state(th.step_dir(run_dir, STEP))
    assert chosen["parameters"]["num_parameters"] == sum(t.numel() for t in state["ema"]["shadow"].values())
    assert chosen["ema"] == {"present": True, "num_updates": STEP, "decay": state["ema"]["decay"],
                             "num_tensors": len(state["ema"]["shadow"])}
    assert chosen["train_state"]["step"] == STEP and chosen["train_state"]["total_skipped"] == 0
    assert chosen["train_state"]["tokens_seen"] == rows[-1]["tokens_seen"]
    r = chosen["recipe"]
    assert (r["model"], r["process"], r["parameterization"], r["loss"]) == ("dit", "absorbing_uniform", "denoiser",
                                                                          "audm_nelbo")
    assert r["model_config"]["hidden_size"] == 32 and r["model_config"]["num_blocks"] == 1
    assert (r["seq_len"], r["world_size"], r["zero_stage"], r["precision"]) == (th.SEQ_LEN, 1, 1, "fp32")
    assert r["sampler"]["name"] == "ancestral" and r["tokenizer"]["name"] == "sentencepiece"
    (cursor,) = chosen["data_cursors"]
    assert cursor["rank"] == 0 and cursor["cursors"] == state["data_cursor"]["cursors"]


def test_inspect_step_dir_and_text_report(run_dir: Path) -> None:
    step2 = th.step_dir(run_dir, SHIFT)
    report = json.loads(ok(tool("inspect_ckpt.py", step2, "--json")).stdout)
    assert Path(report["chosen"]["path"]) == step2 and len(report["checkpoints"]) == 2
    assert report["chosen"]["ema"]["num_updates"] == SHIFT and report["chosen"]["train_state"]["step"] == SHIFT
    text = ok(tool("inspect_ckpt.py", run_dir)).stdout
    assert f"latest -> step_{STEP:010d}" in text and "num_updates=4" in text
    assert f"{report['chosen']['parameters']['num_parameters']:,}" in text
    assert "process=absorbing_uniform" in text and "zero_stage=1" in text


def test_export_writes_self_contained_ema_weights(run_dir: Path, export_dir: Path, loaded_ema) -> None:
    names = {p.name for p in export_dir.iterdir()}
    assert {"model.pt", "recipe.yaml", "meta.json", "tokenizer.model"} <= names
    meta = json.loads((export_dir / "meta.json").read_text())
    assert meta["sha256"] == hashlib.sha256((export_dir / "model.pt").read_bytes()).hexdigest()
    assert (meta["step"], meta["ema"], meta["dtype"], meta["vocab_size"]) == (STEP, True, "fp32", th.VOCAB_SIZE)
    assert Path(meta["source_checkpoint"]) == th.step_dir(run_dir, STEP).resolve()
    exported = torch.load(export_dir / "model.pt", map_location="cpu")
    th.assert_same_tensors(exported, loaded_ema.model.state_dict(), "export vs load_for_inference")
    shadow = th.rank_state(th.step_dir(run_dir, STEP))["ema"]["shadow"]
    for name, value in shadow.items():  # independently of load_for_inference: the stored EMA itself
        assert torch.equal(exported[name], value.float()), name
    try:
        from safetensors.torch import load_file
    except ImportError:
        assert "model.safetensors" not in names
    else:
        th.assert_same_tensors(load_file(export_dir / "model.safetensors"), exported, "safetensors vs model.pt")
    assert (export_dir / "tokenizer.model").read_bytes() == Path(loaded_ema.tokenizer.path).read_bytes()


def test_export_reloads_to_identical_logits(export_dir: Path, loaded_ema) -> None:
    from udmtrain.config import load_recipe
    from udmtrain.data.tokenizers import load_tokenizer
    from udmtrain.train.build import build_components

    meta = json.loads((export_dir / "meta.json").read_text())
    cfg = load_recipe(str(export_dir / "recipe.yaml"))
    assert Path(cfg.tokenizer.cfg.path) == (export_dir / "tokenizer.model").resolve()
    assert load_tokenizer(cfg.tokenizer).vocab_size == meta["vocab_size"]
    model = build_components(cfg, meta["vocab_size"]).model
    model.load_state_dict(torch.load(export_dir / "model.pt", map_location="cpu"))
    model.eval()
    gen = torch.Generator().manual_seed(0)
    V = loaded_ema.components.process.num_states
    xt_BL = torch.randint(0, V, (2, th.SEQ_LEN), generator=gen)
    noise_BL = torch.randint(0, V, (2, th.SEQ_LEN), generator=gen)
    sigma_B = torch.rand(2, generator=gen)
    with torch.no_grad():
        want = loaded_ema.model(xt_BL, sigma_B, noise_BL)
        got = model(xt_BL, sigma_B, noise_BL)
    assert torch.equal(got, want)


def test_export_no_ema_and_bf16(run_dir: Path, export_dir: Path, tmp_path: Path) -> None:
    from udmtrain.engine.deepspeed_engine import load_fp32_state_dict

    ok(tool("export_ckpt.py", run_dir, "--out", tmp_path / "raw", "--no-ema", "--dtype", "bf16"))
    raw = torch.load(tmp_path / "raw" / "model.pt", map_location="cpu")
    ema = torch.load(export_dir / "model.pt", map_location="cpu")
    fp32 = load_fp32_state_dict(th.step_dir(run_dir, STEP))
    assert raw.keys() == ema.keys()
    assert all(v.dtype == torch.bfloat16 for v in raw.values() if v.is_floating_point())
    for name, value in fp32.items():
        assert torch.equal(raw[name], value.to(torch.bfloat16)), name
    assert any(not torch.equal(raw[k].float(), ema[k]) for k in ema), "--no-ema exported the EMA weights"
    meta = json.loads((tmp_path / "raw" / "meta.json").read_text())
    assert (meta["ema"], meta["dtype"]) == (False, "bf16")


def test_export_refuses_existing_dir_without_force(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "exp"
    ok(tool("export_ckpt.py", th.step_dir(run_dir, SHIFT), "--out", out))
    before = (out / "model.pt").read_bytes()
    proc = tool("export_ckpt.py", run_dir, "--out", out)
    assert proc.returncode == 2, th.describe(proc)
    assert "already exists" in proc.stderr and "--force" in proc.stderr and "Traceback" not in proc.stderr
    assert (out / "model.pt").read_bytes() == before and json.loads((out / "meta.json").read_text())["step"] == SHIFT
    ok(tool("export_ckpt.py", run_dir, "--out", out, "--force"))
    assert json.loads((out / "meta.json").read_text())["step"] == STEP
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]  # no .tmp-* / .old-* left behind


@pytest.mark.parametrize("name", ["inspect_ckpt.py", "export_ckpt.py"])
def test_bad_path_exits_2_without_traceback(name: str, tmp_path: Path) -> None:
    missing = tmp_path / "no_such_run"
    extra = ["--out", tmp_path / "out"] if name == "export_ckpt.py" else []
    proc = tool(name, missing, *extra)
    assert proc.returncode == 2, th.describe(proc)
    assert str(missing) in proc.stderr and "does not exist" in proc.stderr and "Traceback" not in proc.stderr
    (tmp_path / "not_a_run").mkdir()
    proc = tool(name, tmp_path / "not_a_run", *extra)
    assert proc.returncode == 2 and "is not a udmtrain run directory" in proc.stderr, th.describe(proc)
    assert not (tmp_path / "out").exists()


def test_export_into_new_directories_loads_like_its_checkpoint(run_dir: Path, tmp_path: Path, loaded_ema) -> None:
    from udmtrain.train import inference as inf
    from udmtrain.train.exports import is_export

    out = tmp_path / "exports" / "nested" / "audm"  # neither exports/ nor nested/ exists yet
    ok(tool("export_ckpt.py", run_dir, "--out", out))
    assert inf.resolve_checkpoint(out) == out and is_export(out) and not is_export(run_dir)
    loaded = inf.load_for_inference(out)
    assert (loaded.step, loaded.use_ema, loaded.vocab_size) == (STEP, True, loaded_ema.vocab_size)
    th.assert_same_tensors(loaded.model.state_dict(), loaded_ema.model.state_dict(), "export vs checkpoint")
    with pytest.raises(inf.InferenceError, match="export of the EMA weights"):
        inf.load_for_inference(out, use_ema=False)
