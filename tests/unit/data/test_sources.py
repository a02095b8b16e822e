"""Sources: file formats, gzip, globs, held-out split, empty documents, bad bytes and bad JSON."""

from __future__ import annotations

import gzip
import json

import pytest

from udmtrain.data.errors import DataError
from udmtrain.data.sources import SourceSpec, SourceStats, iter_documents


def files(tmp_path, **kw):
    return SourceSpec(kind="files", inputs=[str(tmp_path)], **kw)


def test_formats_gzip_empty_and_invalid_utf8(tmp_path):
    (tmp_path / "a.txt").write_text("first document")
    (tmp_path / "b.txt").write_bytes(b"bad \xff\xfe bytes")
    (tmp_path / "c.txt").write_text("   \n")  # empty after stripping
    with gzip.open(tmp_path / "d.jsonl.gz", "wt", encoding="utf-8") as handle:
        handle.write(json.dumps({"text": "from gzip"}) + "\n\n" + json.dumps({"text": ""}) + "\n")
    (tmp_path / "ignored.csv").write_text("x")
    stats = SourceStats()
    docs = list(iter_documents(files(tmp_path, valid_fraction=0), "train", stats))
    assert docs == ["first document", "bad \ufffd\ufffd bytes", "from gzip"]
    assert (stats.documents, stats.empty_documents, stats.documents_with_invalid_utf8) == (3, 2, 1)


def test_glob_and_held_out_share(tmp_path):
    for i in range(10):
        (tmp_path / f"{i}.txt").write_text(f"doc {i}")
    spec = SourceSpec(kind="files", inputs=[str(tmp_path / "*.txt")], valid_fraction=0.25)
    train, valid = list(iter_documents(spec, "train")), list(iter_documents(spec, "valid"))
    assert valid == ["doc 3", "doc 7"]  # every 4th document
    assert sorted(train + valid) == sorted(f"doc {i}" for i in range(10))


def test_bad_json_line_names_file_and_line(tmp_path):
    (tmp_path / "x.jsonl").write_text('{"text": "ok"}\n{broken\n')
    with pytest.raises(DataError, match=r"x\.jsonl:2: invalid JSON"):
        list(iter_documents(files(tmp_path), "train"))
    (tmp_path / "x.jsonl").write_text('{"body": "ok"}\n')
    with pytest.raises(DataError, match=r"x\.jsonl:1: no field 'text'.*--text-field"):
        list(iter_documents(files(tmp_path), "train"))


def test_missing_input(tmp_path):
    with pytest.raises(DataError, match="matches no file"):
        list(iter_documents(SourceSpec(kind="files", inputs=[str(tmp_path / "none*.txt")]), "train"))


def test_demo_source_is_real_prose():
    docs = list(iter_documents(SourceSpec(kind="demo", valid_fraction=0), "train"))
    assert len(docs) > 300 and sum(map(len, docs)) > 1_500_000
    assert docs[0].startswith("The Zen of Python")
