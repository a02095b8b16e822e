"""prepare_data: shard layout, manifest, token totals, idempotent re-runs and exact resume."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from udmtrain.data.errors import DataError
from udmtrain.data.prepare import prepare
from udmtrain.data.sources import SourceSpec
from udmtrain.data.webdataset import iter_raw_samples
from udmtrain.data.shards import decode_sample

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def digests(out):
    return {n: hashlib.sha256(open(os.path.join(out, n), "rb").read()).hexdigest()
            for n in sorted(os.listdir(out)) if n.endswith(".tar")}


def test_layout_manifest_and_token_totals(shards, corpus, gpt2):
    out, manifest = shards
    docs = corpus[1]
    valid_docs = [d for i, d in enumerate(docs) if i % 5 == 4]
    train_docs = [d for i, d in enumerate(docs) if i % 5 != 4]
    for split, split_docs in (("train", train_docs), ("valid", valid_docs)):
        rec = manifest["splits"][split]
        assert rec["num_tokens"] == sum(len(gpt2.encode(d)) + 2 for d in split_docs)
        assert rec["num_documents"] == len(split_docs)
        names = [s["name"] for s in rec["shards"]]
        assert names == [f"{split}-{i:06d}.tar" for i in range(len(names))]
        assert all(s["samples"] == 16 for s in rec["shards"][:-1])
        # the shards hold exactly the wrapped token stream
        stream = []
        for name in names:
            for raw in iter_raw_samples(os.path.join(out, name), lambda e: False):
                ids, doc_ids = decode_sample(raw, 32)
                stream.extend(ids[doc_ids >= 0].tolist())
        assert stream == [t for d in split_docs for t in [50256, *gpt2.encode(d), 50256]]
    on_disk = json.load(open(os.path.join(out, "manifest.json")))
    assert on_disk["vocab_size"] == 50257 and on_disk["seq_len"] == 32 and on_disk["packing"] == "wrap"
    assert on_disk["tokenizer"]["sha256"] == gpt2.identity()["sha256"]
    assert on_disk["source"]["kind"] == "files" and on_disk["samples_per_shard"] == 16


def test_rerun_is_idempotent_and_interrupted_run_resumes_exactly(tmp_path, corpus):
    spec = SourceSpec(kind="files", inputs=[corpus[0]], valid_fraction=0.2)
    out = str(tmp_path / "s")
    first = prepare(spec, "gpt2", 32, out, samples_per_shard=8, progress=False)
    before = digests(out)
    mtimes = {n: os.path.getmtime(os.path.join(out, n)) for n in before}
    again = prepare(spec, "gpt2", 32, out, samples_per_shard=8, progress=False)
    assert {n: os.path.getmtime(os.path.join(out, n)) for n in before} == mtimes  # nothing rewritten
    # a re-run that builds nothing keeps the measured throughput instead of blanking it
    assert first["tokens_per_second"] > 0 and again["tokens_per_second"] == first["tokens_per_second"]
    assert {k: r["tokens_per_second"] for k, r in again["splits"].items()} == \
        {k: r["tokens_per_second"] for k, r in first["splits"].items()}
    # simulate a crash after train shard 2: later shards gone, a half-written temp file left behind
    train = sorted(n for n in before if n.startswith("train"))
    assert len(train) > 4
    for name in train[3:] + [n for n in before if n.startswith("valid")]:
        os.remove(os.path.join(out, name))
        os.remove(os.path.join(out, name[:-4] + ".json"))
    os.remove(os.path.join(out, "manifest.json"))
    open(os.path.join(out, train[3] + ".tmp"), "wb").write(b"partial")
    manifest = prepare(spec, "gpt2", 32, out, samples_per_shard=8, progress=False, num_workers=2)
    assert digests(out) == before
    assert manifest["splits"]["train"]["num_shards"] == len(train)


def test_other_settings_in_same_directory_are_refused(tmp_path, corpus):
    spec = SourceSpec(kind="files", inputs=[corpus[0]], valid_fraction=0.2)
    out = str(tmp_path / "s")
    prepare(spec, "gpt2", 32, out, samples_per_shard=64, progress=False)
    with pytest.raises(DataError, match="seq_len.*differ"):
        prepare(spec, "gpt2", 64, out, samples_per_shard=64, progress=False)


def test_pad_packing_keeps_documents_apart(tmp_path, corpus):
    spec = SourceSpec(kind="files", inputs=[corpus[0]], valid_fraction=0.2)
    out = str(tmp_path / "p")
    prepare(spec, "gpt2", 32, out, packing="pad", samples_per_shard=64, progress=False, splits=("train",))
    for raw in iter_raw_samples(os.path.join(out, "train-000000.tar"), lambda e: False):
        _, doc_ids = decode_sample(raw, 32)
        assert len(set(doc_ids[doc_ids >= 0].tolist())) == 1 and doc_ids[0] >= 0


def test_cli_demo_and_sentencepiece_tokenizer(tmp_path):
    """The documented demo commands: train a tokenizer, then shard the demo corpus with it."""
    model = str(tmp_path / "demo.model")
    env = dict(os.environ, PYTHONPATH=ROOT)
    subprocess.run([sys.executable, "tools/train_tokenizer.py", "--source", "demo", "--vocab-size", "1000",
                    "--out", model], cwd=ROOT, env=env, check=True, capture_output=True)
    res = subprocess.run([sys.executable, "tools/prepare_data.py", "--source", "demo", "--tokenizer", model,
                          "--seq-len", "512", "--samples-per-shard", "1024", "--no-progress",
                          "--num-workers", "1", "--out", str(tmp_path / "d")],
                         cwd=ROOT, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["vocab_size"] == 1000 and summary["splits"]["valid"]["num_tokens"] > 0
    names = sorted(os.listdir(tmp_path / "d"))
    assert "train-000000.tar" in names and "valid-000000.tar" in names and "manifest.json" in names
    bad = subprocess.run([sys.executable, "tools/prepare_data.py", "--source", "files", "--input",
                          str(tmp_path / "missing*.txt"), "--tokenizer", model, "--seq-len", "8", "--out",
                          str(tmp_path / "e")], cwd=ROOT, env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "matches no file" in bad.stderr


def test_prepare_command_for_a_directory_that_holds_other_shards(tmp_path, corpus):
    """The command a recipe's data error suggests must run as printed: prepare_data refuses to mix settings in
    one directory, so a directory that already holds shards gets --overwrite and the alternative."""
    from udmtrain.data.shards import prepare_command

    out = tmp_path / "demo"
    assert prepare_command(str(out / "train-*.tar"), "tok.model", 64) == \
        f"python tools/prepare_data.py --source demo --tokenizer tok.model --seq-len 64 --out {out}"
    prepare(SourceSpec(kind="files", inputs=[corpus[0]], valid_fraction=0.2), "gpt2", 32, str(out),
            samples_per_shard=8, progress=False)
    hint = prepare_command(str(out), "tok.model", 64)
    assert hint.startswith(f"python tools/prepare_data.py --source demo --tokenizer tok.model --seq-len 64 --out {out} "
                           "--overwrite") and "pick a new --out" in hint
    assert prepare_command(str(tmp_path / "mine")).endswith("--source files --input CORPUS --tokenizer TOKENIZER "
                                                           f"--seq-len SEQ_LEN --out {tmp_path / 'mine'}")


@pytest.mark.parametrize("only", ["train", "valid"])
def test_rerun_with_fewer_splits_keeps_the_finished_ones(tmp_path, corpus, data_cfg_class, only):
    """``--splits train`` on a finished data set must not drop 'valid' from the manifest (orphaning its
    shards), nor ``--splits valid`` drop 'train': both were built with the same settings."""
    from udmtrain.data import build_valid_loader

    spec = SourceSpec(kind="files", inputs=[corpus[0]], valid_fraction=0.2)
    out = str(tmp_path / "s")
    first = prepare(spec, "gpt2", 32, out, samples_per_shard=8, progress=False)
    again = prepare(spec, "gpt2", 32, out, samples_per_shard=8, progress=False, splits=(only,))
    on_disk = json.load(open(os.path.join(out, "manifest.json")))
    assert on_disk["splits"] == again["splits"] == first["splits"]  # shards, hashes, stats and rates
    cfg = data_cfg_class(out, out)
    assert sum(len([k for k in b["sample_ids"] if k]) for b in build_valid_loader(cfg, 4, 0, 1)) == \
        first["splits"]["valid"]["num_samples"]
