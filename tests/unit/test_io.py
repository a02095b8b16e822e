"""Atomic writes: the target appears complete or not at all."""

import os

import pytest

from udmtrain.utils.io import atomic_open, write_text_atomic


def test_write_replaces_the_target_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "report.json"
    write_text_atomic(path, "first\n")
    write_text_atomic(path, "second\n")
    assert path.read_text() == "second\n"
    assert os.listdir(path.parent) == ["report.json"]


def test_a_failed_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "samples.jsonl"
    path.write_text("good\n")
    with pytest.raises(RuntimeError):
        with atomic_open(path) as f:
            f.write("half")
            raise RuntimeError("crash mid-write")
    assert path.read_text() == "good\n"
    assert os.listdir(tmp_path) == ["samples.jsonl"]
