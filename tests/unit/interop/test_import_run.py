"""An imported fixture is a normal udmtrain run: written through the Checkpointer (real DeepSpeed, one
in-process gloo rank), logits-exact after the tools' loader, usable by sample.py / eval_ppl.py /
inspect_ckpt.py / export_ckpt.py at the token-id level, and export -> import is exact."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from interop_helpers import expected, fixture, ids_shards, logits

from udmtrain.interop.reference import read_checkpoint
from udmtrain.train.inference import load_for_inference

REPO = Path(__file__).resolve().parents[3]
TOL = 1e-5


def tool(name: str):
    """``tools/<name>.py`` as a module (its ``main(argv)``)."""
    spec = importlib.util.spec_from_file_location(f"tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module", params=["udlm_mean_loo", "mdlm"])
def imported(request, tmp_path_factory, dist_group):
    """(fixture name, run dir) imported with ``tools/import_ckpt.py --tokenizer none``."""
    out = tmp_path_factory.mktemp("imp") / request.param
    assert tool("import_ckpt").main(["--from", "rev_udm", str(fixture(request.param)), "--out", str(out),
                                     "--tokenizer", "none"]) == 0
    return request.param, out


def test_imported_run_is_logits_exact(imported):
    name, run = imported
    exp = expected(name)
    for use_ema, key in ((False, "logits_raw"), (True, "logits_ema")):
        loaded = load_for_inference(run, use_ema=use_ema)
        assert loaded.step == 0 and loaded.meta["imported_from"]["global_step"] == 1234
        assert (logits(loaded.model, exp) - exp[key]).abs().max().item() <= TOL


def test_sample_and_eval_ppl_at_the_token_id_level(imported, tmp_path, capsys):
    name, run = imported
    out = tmp_path / "samples.jsonl"
    assert tool("sample").main(["--ckpt", str(run), "--num-samples", "3", "--steps", "4", "--quiet",
                                "--out", str(out), "--device", "cpu"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3 and all(len(r["token_ids"]) == 12 and max(r["token_ids"]) < 50 for r in rows)
    assert rows[0]["text"] == " ".join(map(str, rows[0]["token_ids"]))  # the ids tokenizer's text
    # validation shards written by the project's own pipeline with the same "ids" tokenizer
    shards = ids_shards(tmp_path, num_docs=6, doc_len=15, valid_fraction=0.5, seed=0)
    report = tmp_path / "ppl.json"
    assert tool("eval_ppl").main(["--ckpt", str(run), "--data", str(shards), "--batch-size", "2",
                                  "--device", "cpu", "--out", str(report)]) == 0
    result = json.loads(report.read_text())["results"][0]
    assert result["num_tokens"] > 0 and 0 < result["nll"] < 50


def test_inspect_probe_and_pc_sampler_with_loo_temperature(imported, tmp_path):
    name, run = imported
    assert tool("inspect_ckpt").main([str(run), "--json"]) == 0
    if name.startswith("udlm"):  # the paper's informed PC sampler with LOO temperature
        out = tmp_path / "pc.jsonl"
        assert tool("sample").main(["--ckpt", str(run), "--num-samples", "2", "--steps", "4", "--quiet",
                                    "--sampler", "pc_gibbs", "--temperature", "0.9", "--temperature-on", "loo",
                                    "--out", str(out), "--device", "cpu"]) == 0
        assert len(out.read_text().splitlines()) == 2
        probe = tmp_path / "probe"
        assert tool("loo_probe").main(["--ckpt", str(run), "--steps", "4", "--num-samples", "2", "--trials", "2",
                                       "--positions", "2", "--device", "cpu", "--out-dir", str(probe)]) == 0
        assert (probe / "probe.json").is_file()


def test_export_then_import_is_exact(imported, tmp_path):
    name, run = imported
    ckpt = tmp_path / "exported.ckpt"
    assert tool("export_ckpt").main([str(run), "--format", "rev_udm", "--out", str(ckpt)]) == 0
    obj = torch.load(ckpt, weights_only=True)  # plain tensors and a plain-dict config
    source = read_checkpoint(fixture(name), "rev_udm")
    for k, v in source.backbone.items():  # the reference's own tensors come back bit for bit
        assert torch.equal(obj["state_dict"]["diffusion.model.backbone." + k], v), k
    assert all(torch.equal(a, source.ema_shadow[n]) for a, n in
               zip(obj["ema"]["shadow_params"], [k for k in source.backbone if k != "rotary_emb.inv_freq"]))
    again = tmp_path / "again"
    assert tool("import_ckpt").main(["--from", "rev_udm", str(ckpt), "--out", str(again), "--tokenizer", "none"]) == 0
    for use_ema in (False, True):
        a = load_for_inference(run, use_ema=use_ema).model.state_dict()
        b = load_for_inference(again, use_ema=use_ema).model.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    import yaml

    recipes = [yaml.safe_load((r / "checkpoints" / "step_0000000000" / "recipe.yaml").read_text())
               for r in (run, again)]
    for recipe in recipes:  # only the run's name / location and its data directory may differ
        del recipe["run"], recipe["data"]["train_shards"], recipe["data"]["valid_shards"]
    assert recipes[0] == recipes[1]


def test_checkpoint_resume_fine_tunes_the_import(imported, tmp_path):
    """``checkpoint.resume: <imported run>`` trains on from the imported weights (launch/pretrain.py)."""
    import os
    import subprocess
    import sys

    name, run = imported
    if name != "mdlm":
        pytest.skip("fine-tuning is checked once, on the MDLM import")
    shards = ids_shards(tmp_path, num_docs=8, doc_len=30, valid_fraction=0.25, seed=1)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    recipe = run / "checkpoints" / "step_0000000000" / "recipe.yaml"
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch" / "pretrain.py"), "--recipe", str(recipe), "run.name=ft",
         f"run.output_root={tmp_path}", f"checkpoint.resume={run}", f"data.train_shards={shards}/train-*.tar",
         f"data.valid_shards={shards}/valid-*.tar", "data.num_workers=0", "train.max_steps=2",
         "engine.micro_batch_size=2", "engine.global_batch_size=2", "eval.every=0", "train.log_every=1"],
        env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resume from {run}/checkpoints/step_0000000000 at step 0" in proc.stdout + proc.stderr
    tuned = load_for_inference(tmp_path / "ft", use_ema=False).model.state_dict()
    start = load_for_inference(run, use_ema=False).model.state_dict()
    assert tuned.keys() == start.keys() and any(not torch.equal(tuned[k], start[k]) for k in start)


@pytest.fixture(scope="module")
def judge(tmp_path_factory, dist_group):
    """A tiny udmtrain AR run over the same 50 ids (an offline gen-PPL judge), saved by the Checkpointer."""
    from udmtrain.config import load_recipe
    from udmtrain.interop.importer import save_run
    from udmtrain.train.build import build_components

    root = tmp_path_factory.mktemp("judge")
    cfg = load_recipe(str(REPO / "recipes" / "quickstart_ar.yaml"), [
        "run.name=judge", f"run.output_root={root}", "tokenizer={name: ids, vocab_size: 50}", "data.seq_len=16",
        "model.hidden_size=32", "model.num_blocks=1", "model.num_heads=2", "engine.precision=fp32",
        "engine.micro_batch_size=2", "engine.global_batch_size=2"])
    torch.manual_seed(0)
    model = build_components(cfg, 50, with_sampler=False).model
    save_run(cfg, model, {k: v.detach().clone() for k, v in model.named_parameters()}, 50, 0, {})
    return root / "judge"


def test_gen_ppl_sweep_on_the_import(imported, judge, tmp_path):
    """gen_ppl.py --sweep (temperature frontier) runs on an imported run; UDLM with the informed PC
    sampler and LOO temperature, the paper's recipe for released models."""
    name, run = imported
    sampler = ["--sampler", "pc_gibbs", "--temperature-on", "loo"] if name.startswith("udlm") else []
    out = tmp_path / "frontier"
    assert tool("gen_ppl").main(["--ckpt", str(run), "--judge", str(judge), "--num-samples", "4", "--steps", "4",
                                 "--device", "cpu", *sampler, "--sweep", "temperature=0.9,1.0",
                                 "--out-dir", str(out)]) == 0
    lines = (out / "frontier.csv").read_text().splitlines()
    assert len(lines) == 3 and all(float(row.split(",")[lines[0].split(",").index("gen_ppl")]) > 0
                                   for row in lines[1:])


def test_bf16_import_keeps_the_exact_fp32_weights(dist_group, tmp_path):
    """With engine.precision bf16 the engine rounds the module; the fp32 masters (what the tools load and
    what a bf16 fine-tune continues from) are set back to the exact imported weights."""
    out = tmp_path / "bf16"
    assert tool("import_ckpt").main(["--from", "rev_udm", str(fixture("audm_shared_mlp")), "--out", str(out),
                                     "--tokenizer", "none", "--precision", "bf16"]) == 0
    step = out / "checkpoints" / "step_0000000000"
    assert (step / "ds" / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt").is_file()
    exp = expected("audm_shared_mlp")
    loaded = load_for_inference(out, use_ema=False)
    assert loaded.cfg.engine.precision == "bf16"
    loaded.model.float()
    assert (logits(loaded.model, exp) - exp["logits_raw"]).abs().max().item() <= TOL


def test_failed_import_leaves_no_run_and_keeps_the_forced_one(tmp_path, monkeypatch):
    """A save that fails half-way leaves nothing under or beside --out, and a --force import that fails
    leaves the earlier import it was replacing as it was; the CLI reports the failures as one line (exit 2)."""
    from udmtrain.interop import importer
    from udmtrain.train.inference import run_cli

    def broken_save(cfg, *args, run_dir, **kwargs):
        (run_dir / "checkpoints").mkdir(parents=True)  # something half-written, then a crash
        raise importer.ImportCheckpointError("disk full (simulated)")

    monkeypatch.setattr(importer, "save_run", broken_save)
    args = ["--from", "rev_udm", str(fixture("mdlm")), "--out", str(tmp_path / "run"), "--tokenizer", "none"]
    assert run_cli(tool("import_ckpt").main, args) == 2
    assert not list(tmp_path.iterdir())
    earlier = tmp_path / "run" / "checkpoints" / "step_0000000000"  # what is_imported_run recognises
    (earlier / "ds").mkdir(parents=True)
    (earlier / "meta.json").write_text(json.dumps({"imported_from": {"layout": "rev_udm"}}))
    (earlier.parent / "latest").write_text(earlier.name + "\n")
    assert importer.is_imported_run(tmp_path / "run")
    assert run_cli(tool("import_ckpt").main, args) == 2  # exists, no --force
    assert run_cli(tool("import_ckpt").main, args + ["--force"]) == 2
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == [
        "run", "run/checkpoints", "run/checkpoints/latest", "run/checkpoints/step_0000000000",
        "run/checkpoints/step_0000000000/ds", "run/checkpoints/step_0000000000/meta.json"]  # no .tmp-* / .old-*
