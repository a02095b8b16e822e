"""Loaders: exact resume, epoch coverage per rank, valid pass once across ranks, bad input."""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections import Counter

import pytest
import torch

from udmtrain.data import build_train_loader, build_valid_loader, check_manifest
from udmtrain.data.errors import DataError



@pytest.fixture(autouse=True)
def _data_cfg(data_cfg_class):
    global DataCfg
    DataCfg = data_cfg_class


def all_train_ids(manifest):
    return {f"{s['name'][:-4]}-{i:06d}" for s in manifest["splits"]["train"]["shards"] for i in range(s["samples"])}


def ids_of(loader, num_batches):
    return [sid for _ in range(num_batches) for sid in next(loader)["sample_ids"]]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_is_exact(shards, num_workers):
    out, _ = shards
    cfg = DataCfg(out, out, num_workers=num_workers)
    straight = build_train_loader(cfg, 4, 0, 1, seed=3)
    expected = ids_of(straight, 23)  # crosses an epoch boundary (the train split has ~78 samples)
    first = build_train_loader(cfg, 4, 0, 1, seed=3)
    got = ids_of(first, 9)
    state = json.loads(json.dumps(first.state_dict()))  # survives serialisation
    first.close()
    resumed = build_train_loader(cfg, 4, 0, 1, seed=3)
    resumed.load_state_dict(state)
    got += ids_of(resumed, 14)
    assert got == expected
    resumed.close()
    straight.close()


DataCfg = None


def test_batch_format(shards):
    out, _ = shards
    batch = next(build_train_loader(DataCfg(out, out), 4, 0, 1, seed=0))
    assert batch["input_ids"].dtype == torch.long and batch["input_ids"].shape == (4, 32)
    assert batch["doc_ids"].shape == (4, 32) and batch["valid"].dtype == torch.bool
    assert torch.equal(batch["valid"], batch["doc_ids"] >= 0) and len(batch["sample_ids"]) == 4


def test_each_epoch_covers_every_sample_once_across_ranks(shards):
    """Two ranks in one process: per epoch, the shards' samples are split without loss or overlap."""
    out, manifest = shards
    total = manifest["splits"]["train"]["num_samples"]
    for epoch_seed in (0, 1):
        seen = Counter()
        for rank in (0, 1):
            loader = build_train_loader(DataCfg(out, out, shuffle_buffer=5), 1, rank, 2, seed=epoch_seed)
            while loader.state_dict()["cursors"][0][0] == 0:  # until the first sample of epoch 1
                seen[next(loader)["sample_ids"][0]] += 1
        # each rank stopped on its first sample of epoch 1; the rest is epoch 0: all ids, once each
        assert sum(seen.values()) == total + 2
        assert set(seen) >= all_train_ids(manifest)


def test_shuffle_changes_order_between_epochs_and_seeds(shards):
    out, manifest = shards
    n = manifest["splits"]["train"]["num_samples"]
    loader = build_train_loader(DataCfg(out, out), 1, 0, 1, seed=0)
    epoch0 = ids_of(loader, n)
    epoch1 = ids_of(loader, n)
    assert sorted(epoch0) == sorted(epoch1) == sorted(all_train_ids(manifest))
    assert epoch0 != epoch1
    assert ids_of(build_train_loader(DataCfg(out, out), 1, 0, 1, seed=1), n) != epoch0


def test_resume_refuses_other_world_size(shards):
    out, _ = shards
    state = build_train_loader(DataCfg(out, out), 2, 0, 1, seed=0).state_dict()
    with pytest.raises(DataError, match=r"world size 1 \(.*this run has 2\)"):
        build_train_loader(DataCfg(out, out), 2, 0, 2, seed=0).load_state_dict(state)


def test_resume_with_other_settings_names_the_recipe_keys(shards):
    """The refusal names what the user sets (data.num_workers, engine.micro_batch_size) with the value that
    resumes exactly, and offers only options that exist."""
    out, _ = shards
    saved = build_train_loader(DataCfg(out, out, num_workers=2), 4, 0, 1, seed=0).state_dict()
    with pytest.raises(DataError) as err:
        build_train_loader(DataCfg(out, out, num_workers=0), 2, 0, 1, seed=0).load_state_dict(saved)
    message = str(err.value)
    assert "data.num_workers=2 (this run: 0)" in message and "engine.micro_batch_size=4 (this run: 2)" in message
    assert "checkpoint.resume=never" in message and "run.name" in message and "\n" not in message
    assert "num_logical_workers" not in message and "afresh" not in message
    single = build_train_loader(DataCfg(out, out, num_workers=0), 4, 0, 1, seed=0).state_dict()
    with pytest.raises(DataError, match=r"data\.num_workers=1 \(or 0\) \(this run: 2\); set that to resume"):
        build_train_loader(DataCfg(out, out, num_workers=2), 4, 0, 1, seed=0).load_state_dict(single)


def test_a_shard_selected_twice_is_refused(shards):
    """A directory plus some of its files (or two spellings of one file) would read those shards twice per
    epoch: refused, naming the shard, the recipe key and the entries that overlap."""
    out, _ = shards
    overlapping = [out, os.path.join(out, "train-00000{0..1}.tar")]
    with pytest.raises(DataError) as err:
        build_train_loader(DataCfg(overlapping, out), 4, 0, 1, seed=0)
    message = str(err.value)
    assert "data.train_shards" in message and os.path.join(out, "train-000000.tar") in message
    assert repr(overlapping[1]) in message and "\n" not in message
    with pytest.raises(DataError, match=r"data\.train_shards selects shard .*train-000000\.tar twice"):
        check_manifest(DataCfg(overlapping, out))
    spellings = [os.path.join(out, "train-000000.tar"), "file:" + os.path.join(out, "..", os.path.basename(out),
                                                                               "train-000000.tar")]
    with pytest.raises(DataError, match=r"data\.valid_shards selects shard .*train-000000\.tar twice"):
        build_valid_loader(DataCfg(out, spellings), 4, 0, 1)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_valid_visits_every_sample_once_with_equal_batch_counts(shards, world_size):
    out, manifest = shards
    expected = {f"{s['name'][:-4]}-{i:06d}" for s in manifest["splits"]["valid"]["shards"] for i in range(s["samples"])}
    seen, lengths = [], []
    for rank in range(world_size):
        batches = list(build_valid_loader(DataCfg(out, out), 3, rank, world_size))
        lengths.append(len(batches))
        for b in batches:
            rows = b["valid"].any(dim=1)
            assert all((sid != "") == bool(r) for sid, r in zip(b["sample_ids"], rows))
            seen += [sid for sid in b["sample_ids"] if sid]
    assert sorted(seen) == sorted(expected) and len(set(lengths)) == 1
    assert list(build_valid_loader(DataCfg(out, out), 3, 0, 1))[0]["sample_ids"][0] == "valid-000000-000000"


def copy_shards(shards, tmp_path):
    out = str(tmp_path / "copy")
    shutil.copytree(shards[0], out)
    return out


def test_truncated_shard_fail_and_skip(shards, tmp_path):
    out = copy_shards(shards, tmp_path)
    path = os.path.join(out, "train-000001.tar")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2 + 100])
    with pytest.raises(Exception, match="train-000001.tar"):
        ids_of(build_train_loader(DataCfg(out, out, on_corrupt="fail"), 4, 0, 1, seed=0), 40)
    loader = build_train_loader(DataCfg(out, out, on_corrupt="skip"), 4, 0, 1, seed=0)
    got = ids_of(loader, 40)
    assert loader.num_corrupt >= 1
    assert not any(s.startswith("train-000001-00001") for s in got)  # the lost second half


def test_corrupt_member_is_skipped_and_counted(shards, tmp_path):
    out = copy_shards(shards, tmp_path)
    from udmtrain.data.webdataset import iter_raw_samples, write_tar

    path = os.path.join(out, "valid-000000.tar")
    raws = list(iter_raw_samples(path, lambda e: False))
    fields = [(r["__key__"], {k: v for k, v in r.items() if k.endswith(".npy")}) for r in raws]
    fields[1][1]["input_ids.npy"] = b"not an npy file"
    write_tar(path, fields)
    with pytest.raises(DataError, match=r"valid-000000\.tar.*not a valid \.npy"):
        list(build_valid_loader(DataCfg(out, out), 4, 0, 1))
    loader = build_valid_loader(DataCfg(out, out, on_corrupt="skip"), 4, 0, 1)
    ids = [s for b in loader for s in b["sample_ids"] if s]
    total = shards[1]["splits"]["valid"]["num_samples"]
    assert loader.num_corrupt == 1 and len(ids) == total - 1 and raws[1]["__key__"] not in ids


def test_missing_shards_name_pattern_and_command(shards, tmp_path):
    out = copy_shards(shards, tmp_path)
    os.remove(os.path.join(out, "train-000002.tar"))
    pattern = os.path.join(out, "train-{000000..000004}.tar")
    with pytest.raises(DataError, match=r"1 of 5 shards .*train-\{000000\.\.000004\}.*python tools/prepare_data.py X"):
        build_train_loader(DataCfg(pattern, out), 4, 0, 1, seed=0)
    with pytest.raises(DataError, match=r"no train-\*\.tar shards in directory .*prepare_data.py"):
        build_train_loader(DataCfg(str(tmp_path), out), 4, 0, 1, seed=0)


def test_check_manifest(shards, tmp_path, gpt2):
    out, _ = shards
    assert check_manifest(DataCfg(out, out), expected_vocab_size=50257).seq_len == 32
    with pytest.raises(DataError, match=r"data.seq_len=64 but the shards were built with seq_len=32"):
        check_manifest(DataCfg(out, out, seq_len=64))
    with pytest.raises(DataError, match=r"vocabulary size 50258 expected.*V=50257"):
        check_manifest(DataCfg(out, out), expected_vocab_size=50258)
    with pytest.raises(DataError, match=r"data.tokenizer is 'sentencepiece' but the shards were tokenized with 'gpt2'"):
        check_manifest(DataCfg(out, out, tokenizer="x.model"), expected_tokenizer=type("S", (), {
            "name": "sentencepiece", "cfg": type("C", (), {"path": "x.model"})()})())
    other = copy_shards(shards, tmp_path)
    manifest = json.load(open(os.path.join(other, "manifest.json")))
    manifest["tokenizer"]["sha256"] = "0" * 64
    json.dump(manifest, open(os.path.join(other, "manifest.json"), "w"))
    with pytest.raises(DataError, match="tokenizer files differ"):
        check_manifest(DataCfg(other, other))
    os.remove(os.path.join(other, "manifest.json"))
    with pytest.raises(DataError, match="no manifest at"):
        check_manifest(DataCfg(other, other))


def test_bench_reports_throughput(shards):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "bench_data", os.path.join(os.path.dirname(__file__), "..", "..", "..", "tools", "bench_data.py"))
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench_data"] = bench  # dataclasses need their module registered
    spec.loader.exec_module(bench)
    args = bench.build_parser().parse_args(["--shards", shards[0], "--batch-size", "4", "--num-workers", "0",
                                            "--num-batches", "5", "--warmup-batches", "1"])
    report = bench.run_data_bench(args)
    assert report["samples_per_s"] > 0 and 0 < report["tokens_per_s"] <= report["positions_per_s"]
