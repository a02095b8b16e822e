"""The evaluation CLIs end to end on tiny real checkpoints (CPU, ~1-2 minutes in all).

Once per module: a small corpus from the offline demo documents, a sentencepiece tokenizer and
seq-len-32 shards in tmp (so a clean clone suffices), then three 4-step runs through
``launch/pretrain.py`` (AUDM, AR, uniform-process LOO). Every tool runs as a subprocess, as a user
would run it, and its JSON is checked.
"""

import csv
import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1",
       "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))}
ENV.pop("UDMTRAIN_DEBUG", None)
for _var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
    ENV.pop(_var, None)


def run(*args, check=True, timeout=300, env=None):
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=REPO, env=env or ENV, capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args[:2]} exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\n"
                             f"stderr:\n{proc.stderr[-5000:]}")
    return proc


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from udmtrain.data.demo_corpus import iter_demo_documents

    d = tmp_path_factory.mktemp("evaldata")
    with open(d / "corpus.jsonl", "w") as f:
        for _, text in itertools.islice(iter_demo_documents(), 40):
            f.write(json.dumps({"text": text[:3000].encode("ascii", "ignore").decode()}) + "\n")
    run(REPO / "tools/train_tokenizer.py", "--source", "files", "--input", d / "corpus.jsonl", "--vocab-size", 384,
        "--out", d / "tok.model")
    run(REPO / "tools/prepare_data.py", "--source", "files", "--input", d / "corpus.jsonl", "--tokenizer",
        d / "tok.model", "--seq-len", 32, "--valid-fraction", 0.2, "--samples-per-shard", 64, "--out",
        d / "shards", "--no-progress", "--num-workers", 0)
    return d


TINY = ["data.seq_len=32", "data.num_workers=0", "model.hidden_size=32", "model.num_blocks=1",
        "model.num_heads=2", "engine.global_batch_size=4", "engine.micro_batch_size=4", "engine.precision=fp32",
        "train.max_steps=4", "train.log_every=1", "checkpoint.every=2", "eval.every=4", "eval.num_batches=null",
        "lr_schedule.warmup_steps=1"]


@pytest.fixture(scope="module")
def runs(data):
    common = [f"data.train_shards={data}/shards/train-*.tar", f"data.valid_shards={data}/shards/valid-*.tar",
              f"tokenizer.path={data}/tok.model", f"run.output_root={data}/runs", *TINY]
    specs = {
        "audm": ("quickstart.yaml", ["model.cond_dim=32"]),
        "ar": ("quickstart_ar.yaml", []),
        "udlm": ("quickstart.yaml", ["model.cond_dim=32", "process.name=uniform", "parameterization.name=loo",
                                     "loss.name=plugin_nelbo", "model.noise_conditioning=none"]),
    }
    for name, (recipe, extra) in specs.items():
        run(REPO / "launch/pretrain.py", "--recipe", REPO / "recipes" / recipe, f"run.name={name}", *common, *extra)
    return {name: data / "runs" / name for name in specs}


def manifest(data):
    return json.loads((data / "shards" / "manifest.json").read_text())


def eval_json(ckpt, tmp_path, *args):
    out = tmp_path / "ppl.json"
    run(REPO / "tools/eval_ppl.py", "--ckpt", ckpt, "--out", out, *args)
    return json.loads(out.read_text())


def test_eval_ppl_diffusion_counts_every_valid_token(runs, data, tmp_path):
    report = eval_json(runs["audm"], tmp_path, "--num-t-samples", 2, "--seed", 3)
    (res,) = report["results"]
    valid = manifest(data)["splits"]["valid"]
    assert math.isfinite(res["nll"]) and res["nll"] > 0 and math.isfinite(res["nll_stderr"])
    assert res["num_tokens"] == valid["num_tokens"] and res["num_sequences"] == valid["num_samples"]
    assert res["ppl"] == pytest.approx(math.exp(res["nll"])) and res["bpd"] == pytest.approx(res["nll"] / math.log(2))
    assert (res["method"], res["num_t_samples"], res["seed"], report["ema"], report["step"]) == ("mc", 2, 3, True, 4)
    assert not {"checkpoint", "step", "ema"} & set(res)  # the checkpoint fields appear once, at the top
    assert res["eps"] == pytest.approx(1e-3) and report["checkpoint"].endswith("step_0000000004")


def test_eval_ppl_quadrature_agrees_with_mc(runs, tmp_path):
    mc = eval_json(runs["audm"], tmp_path, "--num-t-samples", 4, "--method", "mc")["results"][0]
    quad = eval_json(runs["audm"], tmp_path, "--num-t-samples", 4, "--method", "quadrature")["results"][0]
    assert quad["method"] == "quadrature"
    tolerance = 4 * math.hypot(mc["nll_stderr"], quad["nll_stderr"]) + 0.05 * mc["nll"]
    assert abs(mc["nll"] - quad["nll"]) < tolerance


def test_eval_ppl_ar_is_the_trainer_validation_nll(runs, data, tmp_path):
    (res,) = eval_json(runs["ar"], tmp_path)["results"]
    logged = [json.loads(line) for line in (runs["ar"] / "metrics.jsonl").read_text().splitlines()]
    val = [r["val/nll"] for r in logged if "val/nll" in r and r["step"] == 4]
    assert res["estimator"] == "exact_ar" and val
    assert res["nll"] == pytest.approx(val[-1], rel=1e-6)


def test_eval_ppl_two_ranks_match_one(runs, tmp_path):
    one = eval_json(runs["ar"], tmp_path)["results"][0]
    out = tmp_path / "two.json"
    env = {**ENV, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           str(REPO / "tools/eval_ppl.py"), "--ckpt", str(runs["ar"]), "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    two = json.loads(out.read_text())
    assert two["world_size"] == 2 and two["results"][0]["num_ranks"] == 2
    assert two["results"][0]["num_tokens"] == one["num_tokens"]
    assert two["results"][0]["nll"] == pytest.approx(one["nll"], rel=1e-9)


def test_sample_writes_n_samples_of_seq_len(runs, tmp_path):
    out = tmp_path / "s.jsonl"
    proc = run(REPO / "tools/sample.py", "--ckpt", runs["audm"], "--num-samples", 3, "--batch-size", 2,
               "--steps", 5, "--seed", 7, "--out", out, "sampler.cache=false")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    from udmtrain.utils.seed import batch_seed

    assert len(rows) == 3 and [r["seed"] for r in rows] == [batch_seed(7, 0), batch_seed(7, 0), batch_seed(7, 1)]
    assert all(len(r["token_ids"]) == 32 and r["nfe"] == 5 for r in rows)
    assert all(r["sampler"]["num_steps"] == 5 and r["sampler"]["cache"] is False for r in rows)
    assert rows[0]["text"] in proc.stdout


def test_sample_bad_sampler_key_is_a_config_report(runs):
    proc = run(REPO / "tools/sample.py", "--ckpt", runs["audm"], "--num-samples", 1, "sampler.bogus=1", check=False)
    assert proc.returncode == 2 and "sampler.bogus" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("tool", ["sample.py", "eval_ppl.py", "gen_ppl.py", "loo_probe.py"])
def test_missing_checkpoint_is_one_clear_line(tool, tmp_path):
    missing = tmp_path / "no-such-run"
    extra = ["--out-dir", tmp_path] if tool == "loo_probe.py" else []
    proc = run(REPO / "tools" / tool, "--ckpt", missing, *extra, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"checkpoint '{missing}' does not exist" in proc.stderr


def test_gen_ppl_with_the_ar_run_as_judge(runs, tmp_path):
    from udmtrain.utils.seed import batch_seed

    out = tmp_path / "g.json"
    run(REPO / "tools/gen_ppl.py", "--ckpt", runs["audm"], "--num-samples", 3, "--steps", 4, "--judge", runs["ar"],
        "--judge-batch-size", 2, "--out", out)
    r = json.loads(out.read_text())
    assert math.isfinite(r["gen_ppl"]) and r["gen_ppl"] > 1 and r["entropy"] > 0 and r["num_samples"] == 3
    assert r["judge"]["kind"] == "udmtrain_ar" and r["judge"]["step"] == 4
    assert r["sampler"]["num_steps"] == 4 and r["seeds"]["batch_seeds"] == [batch_seed(0, 0)]


def test_gen_ppl_sweep_is_resumable(runs, tmp_path):
    args = [REPO / "tools/gen_ppl.py", "--ckpt", runs["audm"], "--num-samples", 2, "--judge", runs["ar"],
            "--sweep", "temperature=0.9,1.0", "steps=2,3", "--out-dir", tmp_path / "sweep"]
    run(*args)
    csv_path = tmp_path / "sweep" / "frontier.csv"
    first = csv_path.read_text()
    rows = list(csv.DictReader(first.splitlines()))
    assert len(rows) == 4 and {(r["steps"], r["temperature"]) for r in rows} == {
        ("2", "0.9"), ("2", "1.0"), ("3", "0.9"), ("3", "1.0")}
    assert all(math.isfinite(float(r["gen_ppl"])) for r in rows)
    assert (tmp_path / "sweep" / "frontier.png").stat().st_size > 0
    again = run(*args)
    assert csv_path.read_text() == first and "4 reused" in again.stderr
    stdout_rows = json.loads(again.stdout)["rows"]
    assert {type(r["steps"]) for r in stdout_rows} == {int} and all(isinstance(r["gen_ppl"], float) for r in stdout_rows)
    reports = sorted(p.name for p in (tmp_path / "sweep" / "reports").iterdir())
    assert reports[0].startswith("steps2_T0.9_p1_") and not any(".0_" in name for name in reports)  # no "2.0"
    # another --num-samples changes every result: recomputed, and the old rows are not returned
    changed = run(*[a if a != 2 else 3 for a in args[:5]], *args[5:])
    new_rows = json.loads(changed.stdout)["rows"]
    assert len(new_rows) == 4 and {r["num_samples"] for r in new_rows} == {3}
    assert "num_samples 2 -> 3" in changed.stderr and len(list(csv.DictReader(csv_path.open()))) == 8


def test_loo_probe_on_uniform_and_refusal_elsewhere(runs, tmp_path):
    run(REPO / "tools/loo_probe.py", "--ckpt", runs["udlm"], "--steps", 3, "--num-samples", 2, "--positions", 2,
        "--trials", 2, "--out-dir", tmp_path / "probe")
    result = json.loads((tmp_path / "probe" / "probe.json").read_text())
    assert len(result["curve"]) == sum(result["protocol"]["nfe"]) and all(v >= 0 for v in result["curve"])
    assert (tmp_path / "probe" / "probe.png").stat().st_size > 0
    proc = run(REPO / "tools/loo_probe.py", "--ckpt", runs["audm"], "--out-dir", tmp_path / "p2", check=False)
    assert proc.returncode == 2 and "uniform process" in proc.stderr and "Traceback" not in proc.stderr


def test_ar_runs_are_named_and_logged_as_such(runs, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for tool, extra in (("sample.py", []), ("gen_ppl.py", ["--judge", runs["ar"]])):
        # --steps would otherwise fail on the AR recipe's empty sampler section with a confusing report
        proc = run(REPO / "tools" / tool, "--ckpt", runs["ar"], "--steps", 4, *extra, check=False)
        assert proc.returncode == 2 and "is an autoregressive run" in proc.stderr and "Traceback" not in proc.stderr
    ar = [json.loads(x) for x in (runs["ar"] / "metrics.jsonl").read_text().splitlines()]
    audm = [json.loads(x) for x in (runs["audm"] / "metrics.jsonl").read_text().splitlines()]
    assert any("train/ppl" in r for r in ar) and not any("train/ppl_bound" in r for r in ar)  # exact for AR
    assert any("train/ppl_bound" in r for r in audm)
    texts = {}
    for name in ("audm", "ar"):
        acc = EventAccumulator(str(runs[name] / "tensorboard"), size_guidance={"tensors": 0})
        acc.Reload()
        texts[name] = acc.Tags()["tensors"]
    assert "recipe/text_summary" in texts["ar"] and "samples/text_summary" not in texts["ar"]
    assert {"recipe/text_summary", "samples/text_summary"} <= set(texts["audm"])  # decoded samples at eval


def test_relaunching_a_finished_run_says_so(runs, data):
    common = [f"data.train_shards={data}/shards/train-*.tar", f"data.valid_shards={data}/shards/valid-*.tar",
              f"tokenizer.path={data}/tok.model", f"run.output_root={data}/runs", *TINY]
    proc = run(REPO / "launch/pretrain.py", "--recipe", REPO / "recipes" / "quickstart_ar.yaml", "run.name=ar", *common)
    assert "already at train.max_steps 4" in proc.stderr and "train.max_steps=8" in proc.stderr
