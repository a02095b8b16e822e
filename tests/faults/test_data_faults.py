"""Data faults: the manifest, not the file system, defines the data set (docs/data.md, docs/security.md)."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from fault_helpers import REPO, TINY, VOCAB_SIZE, assert_refused, data_overrides, tool

from udmtrain.data.errors import DataError
from udmtrain.data.loader import build_train_loader, build_valid_loader
from udmtrain.data.webdataset import iter_raw_samples, write_tar


def pretrain():
    if "udmtrain_launch_pretrain" not in sys.modules:
        spec = importlib.util.spec_from_file_location("udmtrain_launch_pretrain", REPO / "launch" / "pretrain.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["udmtrain_launch_pretrain"] = module
        spec.loader.exec_module(module)
    return sys.modules["udmtrain_launch_pretrain"]


def launch_check(data: Path, capsys, *extra: str) -> tuple[int, str]:
    """``launch/pretrain.py`` up to its data check (it returns 2 there, before any process group)."""
    code = pretrain().main(["--recipe", str(REPO / "recipes/quickstart.yaml"), "run.name=x", "train.max_steps=1",
                            *TINY, *data_overrides(data), *extra])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def manifest(data: Path) -> dict:
    return json.loads((data / "manifest.json").read_text())


def save_manifest(data: Path, record: dict) -> None:
    (data / "manifest.json").write_text(json.dumps(record))


def rewrite(path: Path, edit) -> None:
    """Rewrite shard ``path`` with ``edit(list of (key, fields))`` applied (a well-formed tar)."""
    raws = list(iter_raw_samples(str(path), lambda e: False))
    samples = [(r["__key__"], {k: v for k, v in r.items() if k.endswith(".npy")}) for r in raws]
    write_tar(str(path), edit(samples))


def reseal(data: Path, name: str, split: str = "train") -> None:
    """Record ``name``'s new size and sha256 in the manifest, as if prepare_data had written it."""
    record = manifest(data)
    for shard in record["splits"][split]["shards"]:
        if shard["name"] == name:
            shard["bytes"] = os.path.getsize(data / name)
            shard["sha256"] = hashlib.sha256((data / name).read_bytes()).hexdigest()
    save_manifest(data, record)


class Cfg:
    def __init__(self, data: Path, **kw) -> None:
        self.train_shards = self.valid_shards = str(data)
        self.seq_len, self.shuffle_buffer, self.num_workers, self.on_corrupt, self.shuffle = 32, 0, 0, "fail", False
        self.manifest = None
        self.__dict__.update(kw)


def drain(loader, batches: int) -> list[str]:
    return [key for _ in range(batches) for key in next(loader)["sample_ids"]]


def test_prepare_data_records_sizes_and_sha256_and_publishes_whole(tiny_data: Path) -> None:
    record = manifest(tiny_data)
    for split in ("train", "valid"):
        for shard in record["splits"][split]["shards"]:
            blob = (tiny_data / shard["name"]).read_bytes()
            assert shard["bytes"] == len(blob) and shard["sha256"] == hashlib.sha256(blob).hexdigest()
    assert not Path(str(tiny_data) + ".partial").exists()


def test_missing_shard_listed_in_manifest(data_copy: Path, capsys) -> None:
    (data_copy / "train-000001.tar").unlink()
    code, out = launch_check(data_copy, capsys)
    assert_refused(code, out, "train-000001.tar", "missing")


def test_extra_shard_not_in_manifest(data_copy: Path, capsys) -> None:
    shutil.copy(data_copy / "train-000000.tar", data_copy / "train-999999.tar")
    code, out = launch_check(data_copy, capsys)
    assert_refused(code, out, "train-999999.tar", "not listed")


def test_shard_cut_at_member_boundary_is_refused_by_size(data_copy: Path, capsys) -> None:
    rewrite(data_copy / "train-000001.tar", lambda s: s[:5])
    code, out = launch_check(data_copy, capsys)
    assert_refused(code, out, "train-000001.tar", "bytes")


def test_count_mismatch_without_recorded_sizes(data_copy: Path, caplog) -> None:
    """An old manifest (no bytes/sha256): the cut shard is caught when it is exhausted."""
    record = manifest(data_copy)
    for split in record["splits"].values():
        for shard in split["shards"]:
            shard.pop("bytes"), shard.pop("sha256")
    save_manifest(data_copy, record)
    rewrite(data_copy / "train-000000.tar", lambda s: s[:5])  # the first shard read (no shuffle)
    with pytest.raises(DataError) as err:
        drain(build_train_loader(Cfg(data_copy), 4, 0, 1, seed=0), 10)
    assert "train-000000.tar" in str(err.value) and "5 samples" in str(err.value) and "\n" not in str(err.value)
    assert "records no shard sizes" in caplog.text
    loader = build_train_loader(Cfg(data_copy, on_corrupt="skip"), 4, 0, 1, seed=0)
    drain(loader, 10)
    assert loader.num_corrupt == 1


def test_manifest_vocab_size_checked_against_tokenizer(data_copy: Path, capsys) -> None:
    record = manifest(data_copy)
    record["vocab_size"] = VOCAB_SIZE + 100
    save_manifest(data_copy, record)
    code, out = launch_check(data_copy, capsys)
    assert_refused(code, out, "manifest.json", str(VOCAB_SIZE + 100))


def _plant_bad_id(data: Path) -> str:
    """Token id V in the second sample of train-000000.tar (re-sealed: only the id check can see it)."""
    key = []

    def edit(samples):
        ids = np.load(io.BytesIO(samples[1][1]["input_ids.npy"]))
        ids[3] = VOCAB_SIZE
        buf = io.BytesIO()
        np.save(buf, ids)
        samples[1][1]["input_ids.npy"] = buf.getvalue()
        key.append(samples[1][0])
        return samples

    rewrite(data / "train-000000.tar", edit)
    reseal(data, "train-000000.tar")
    return key[0]


@pytest.mark.parametrize("workers", [0, 1])
def test_token_id_out_of_range_names_shard_and_key(data_copy: Path, workers: int) -> None:
    key = _plant_bad_id(data_copy)
    loader = build_train_loader(Cfg(data_copy, num_workers=workers), 4, 0, 1, seed=0)
    try:
        with pytest.raises(DataError) as err:
            drain(loader, 40)
    finally:
        loader.close()
    message = str(err.value)
    assert "train-000000.tar" in message and key in message and str(VOCAB_SIZE) in message
    assert "\n" not in message and "Traceback" not in message  # not a DataLoader worker's wrapped traceback
    loader = build_train_loader(Cfg(data_copy, on_corrupt="skip"), 4, 0, 1, seed=0)
    assert key not in drain(loader, 30) and loader.num_corrupt == 1


def test_valid_set_is_exactly_the_manifests(data_copy: Path) -> None:
    total = manifest(data_copy)["splits"]["valid"]["num_samples"]
    seen = [k for batch in build_valid_loader(Cfg(data_copy), 4, 0, 1) for k in batch["sample_ids"] if k]
    assert len(seen) == len(set(seen)) == total


def test_shell_urls_need_opt_in_in_the_loader(data_copy: Path, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    with pytest.raises(DataError, match="allow_shell_urls"):
        build_train_loader(Cfg(data_copy, train_shards=f"pipe:touch {marker}"), 4, 0, 1, seed=0)
    assert not marker.exists()


@pytest.mark.parametrize("case", ["no_valid_docs", "missing_input", "valid_fraction"])
def test_prepare_data_leaves_nothing_on_a_clean_error(tmp_path: Path, tiny_data: Path, capsys, case: str) -> None:
    corpus = tmp_path / "one.txt"
    corpus.write_text("a single document on a single line " * 200)
    out = tmp_path / "out"
    args = {"no_valid_docs": ["--input", str(corpus)], "missing_input": ["--input", str(tmp_path / "nope.txt")],
            "valid_fraction": ["--input", str(corpus), "--valid-fraction", "2"]}[case]
    argv = ["--source", "files", *args, "--tokenizer", str(tiny_data / "tokenizer.model"), "--seq-len", "32",
            "--num-workers", "0", "--no-progress", "--out", str(out)]
    try:
        code = tool("prepare_data").main(argv)
    except SystemExit as exit_:  # argparse
        code = exit_.code
    captured = capsys.readouterr()
    culprit = {"no_valid_docs": "valid", "missing_input": "nope.txt", "valid_fraction": "--valid-fraction"}[case]
    assert_refused(code, captured.out + captured.err, culprit)
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith("out")]
    assert not leftovers or all(not any(p.iterdir()) for p in leftovers), leftovers


def test_interrupted_prepare_resumes_from_partial_and_publishes(tmp_path: Path, tiny_data: Path) -> None:
    from udmtrain.data.prepare import prepare
    from udmtrain.data.sources import SourceSpec

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"document {i} " + "words here " * (i % 7 + 3)}) + "\n"
                              for i in range(300)))
    spec = SourceSpec(kind="files", inputs=[str(corpus)], valid_fraction=0.1)
    out = tmp_path / "out"
    tok = str(tiny_data / "tokenizer.model")
    prepare(spec, tok, 32, str(out), samples_per_shard=8, progress=False)
    published = {p.name: p.read_bytes() for p in out.iterdir()}
    # an interruption: the data set as it was mid-build, in out.partial, with a half-written shard
    partial = Path(str(out) + ".partial")
    shutil.copytree(out, partial)
    shutil.rmtree(out)
    train = sorted(n for n in published if n.startswith("train") and n.endswith(".tar"))
    for name in train[2:] + [n for n in published if n.startswith("valid")]:
        (partial / name).unlink(missing_ok=True)
        (partial / (name[:-4] + ".json")).unlink(missing_ok=True)
    (partial / "manifest.json").unlink()
    (partial / (train[2] + ".tmp")).write_bytes(b"half")
    prepare(spec, tok, 32, str(out), samples_per_shard=8, progress=False)
    assert not partial.exists()
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != "manifest.json"} == \
        {k: v for k, v in published.items() if k != "manifest.json"}


@pytest.mark.parametrize("policy", ["fail", "skip"])
def test_training_reports_corrupt_data(data_copy: Path, tmp_path: Path, policy: str) -> None:
    """``fail``: one line naming shard and sample key, exit 2; ``skip``: counted on the console line
    and in metrics.jsonl."""
    from fault_helpers import run

    key = _plant_bad_id(data_copy)
    proc = run(["launch/pretrain.py", "--recipe", "recipes/quickstart.yaml", "run.name=c",
                f"run.output_root={tmp_path}", *TINY, *data_overrides(data_copy), "train.max_steps=2",
                "data.shuffle=false", f"data.on_corrupt={policy}"])
    output = proc.stdout + proc.stderr
    if policy == "fail":
        assert_refused(proc.returncode, output, "train-000000.tar", key)
        return
    assert proc.returncode == 0, output[-3000:]
    records = [json.loads(line) for line in (tmp_path / "c" / "metrics.jsonl").read_text().splitlines()]
    assert max(r.get("data/corrupt_skipped", 0) for r in records) == 1
    assert "corrupt_skipped 1" in proc.stdout


def _prepare_argv(data: Path, tokenizer: Path, *extra: str) -> list[str]:
    """The prepare_data command of ``tiny_data`` (conftest.py), aimed at ``data``."""
    return ["--source", "demo", "--tokenizer", str(tokenizer), "--seq-len", "32", "--samples-per-shard", "512",
            "--num-workers", "0", "--no-progress", "--out", str(data), *extra]


def test_prepare_data_splits_train_keeps_the_finished_valid_split(data_copy: Path) -> None:
    """Re-running with ``--splits train`` on a finished data set keeps 'valid' in the manifest (its shards
    are not orphaned), so validation still finds it."""
    before = manifest(data_copy)
    assert tool("prepare_data").main(_prepare_argv(data_copy, data_copy / "tokenizer.model", "--splits", "train")) == 0
    after = manifest(data_copy)
    assert after["splits"] == before["splits"]
    seen = [k for batch in build_valid_loader(Cfg(data_copy), 4, 0, 1) for k in batch["sample_ids"] if k]
    assert len(seen) == before["splits"]["valid"]["num_samples"]


def test_damaged_tokenizer_is_one_line_not_a_traceback(data_copy: Path, capsys) -> None:
    """A truncated sentencepiece model: the launch, its dry run and prepare_data name the file and the fix."""
    model = data_copy / "tokenizer.model"
    model.write_bytes(model.read_bytes()[:3000])
    code, out = launch_check(data_copy, capsys)
    line = assert_refused(code, out, str(model), "tools/train_tokenizer.py")
    assert "tokenizer.path" in line and "not found" not in line
    assert "Build shards for this recipe" not in out  # new shards would not mend the tokenizer
    code = pretrain().main(["--recipe", str(REPO / "recipes/quickstart.yaml"), "--dry-run", *TINY,
                            *data_overrides(data_copy)])
    assert code == 0  # a dry run counts no parameters then, and says why
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err and str(model) in captured.out
    code = tool("prepare_data").main(_prepare_argv(data_copy / "again", model))
    captured = capsys.readouterr()
    assert_refused(code, captured.out + captured.err, str(model), "--force")


def test_train_tokenizer_refuses_to_replace_a_model_without_force(data_copy: Path, tmp_path: Path, capsys) -> None:
    """The data set's own tokenizer retrained under it would decode its shards wrongly: --out must be new,
    or --force given; a failed forced training leaves the old model as it was."""
    from fault_helpers import call

    model = data_copy / "tokenizer.model"
    before = model.read_bytes()
    from udmtrain.data.demo_corpus import iter_demo_documents

    corpus = tmp_path / "corpus.jsonl"  # enough text for a V=400 model: without the refusal it would train
    corpus.write_text("".join(json.dumps({"text": text}) + "\n" for _, text in list(iter_demo_documents())[:30]))
    argv = ["--source", "files", "--input", str(corpus), "--vocab-size", "400", "--out", str(model)]
    code, out = call("train_tokenizer", argv, capsys)
    assert_refused(code, out, f"--out {model}", "--force")
    assert model.read_bytes() == before
    code, out = call("train_tokenizer", [*argv[:-3], "100000", "--out", str(model), "--force"], capsys)
    assert_refused(code, out, "sentencepiece training failed")
    assert model.read_bytes() == before
    assert not [p.name for p in data_copy.iterdir() if ".tmp" in p.name]
    code, out = call("train_tokenizer", [*argv, "--force"], capsys)
    assert code == 0, out
    assert json.loads(out)["vocab_size"] == 400 and model.read_bytes() != before


def test_verify_finds_a_same_size_change_that_the_size_check_cannot(data_copy: Path, capsys) -> None:
    """The manifest's sha256 is checked by prepare_data --verify (training compares sizes only), and a
    re-run of prepare_data does not re-seal the changed shard."""
    from fault_helpers import call

    from udmtrain.data.manifest import check_manifest

    code, out = call("prepare_data", ["--verify", "--out", str(data_copy)], capsys)
    assert code == 0, out
    record = manifest(data_copy)
    assert json.loads(out)["verified"] == {s: r["num_shards"] for s, r in record["splits"].items()}
    shard = data_copy / "train-000001.tar"
    blob = bytearray(shard.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    shard.write_bytes(bytes(blob))
    check_manifest(Cfg(data_copy))  # same size: the pre-training check cannot see it
    code, out = call("prepare_data", ["--verify", "--out", str(data_copy)], capsys)
    assert_refused(code, out, str(shard), "sha256")
    code, out = call("prepare_data", _prepare_argv(data_copy, data_copy / "tokenizer.model"), capsys)
    assert_refused(code, out, str(shard), "--overwrite")
    assert manifest(data_copy) == record


def test_a_shard_selected_twice_is_refused_before_training(data_copy: Path, capsys) -> None:
    code, out = launch_check(data_copy, capsys, f"data.train_shards={data_copy}/train-00000{{0,1,1}}.tar")
    assert_refused(code, out, "data.train_shards", str(data_copy / "train-000001.tar"), "twice")
    assert "Build shards for this recipe" not in out
