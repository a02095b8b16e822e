"""Output directories that ``--force`` must not destroy (docs/security.md): tools/export_ckpt.py and
tools/import_ckpt.py replace only an empty directory or their own earlier output, never the source
nor a directory around or inside it, and a single-file ``--format rev_udm`` export refuses a directory
before the conversion. Each refusal: exit 2, one line naming ``--out`` and the fix, nothing touched."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from fault_helpers import REPO, assert_refused, call

SOURCE = REPO / "tests" / "data" / "rev_udm" / "mdlm.ckpt"


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with a file's bytes (None for a directory): equal snapshots, nothing touched."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


def step_of(export: Path) -> int:
    return json.loads((export / "meta.json").read_text())["step"]


@pytest.mark.parametrize("where", ["run", "inside", "around"])
def test_export_never_writes_at_around_or_inside_its_source(run_copy: Path, where: str, capsys) -> None:
    """``export_ckpt.py runs/x --out runs/x --force`` used to delete the run's checkpoints."""
    step_dir = next((run_copy / "checkpoints").glob("step_*"))
    source, out = {"run": (run_copy, run_copy), "inside": (run_copy, run_copy / "exports" / "x"),
                   "around": (step_dir, run_copy / "checkpoints")}[where]
    before = snapshot(run_copy)
    code, output = call("export_ckpt", [str(source), "--out", str(out), "--force"], capsys)
    line = assert_refused(code, output, "--out", str(out), "source")
    assert str(source) in line
    assert snapshot(run_copy) == before
    assert sorted(p.name for p in run_copy.parent.iterdir()) == ["base"]  # no .tmp-* / .old-* beside it


def test_export_force_replaces_only_an_empty_directory_or_an_export(run_copy: Path, tmp_path: Path, capsys) -> None:
    """``--out exports --force`` used to delete every export under exports/; a file added to an export
    is kept too. An empty directory and an untouched earlier export are replaced."""
    exports = tmp_path / "exports"
    (exports / "empty").mkdir(parents=True)
    assert call("export_ckpt", [str(run_copy), "--out", str(exports / "empty"), "--force"], capsys)[0] == 0
    assert call("export_ckpt", [str(run_copy), "--out", str(exports / "a"), "--no-ema"], capsys)[0] == 0
    assert json.loads((exports / "a" / "meta.json").read_text())["ema"] is False
    (exports / "notes.txt").write_text("not an export")
    before = snapshot(exports)
    code, output = call("export_ckpt", [str(run_copy), "--out", str(exports), "--force"], capsys)
    assert "a/" in assert_refused(code, output, "--out", str(exports), "notes.txt", "--force replaces only")
    assert snapshot(exports) == before

    assert call("export_ckpt", [str(run_copy), "--out", str(exports / "a"), "--force"], capsys)[0] == 0
    assert json.loads((exports / "a" / "meta.json").read_text())["ema"] is True  # the earlier export replaced
    (exports / "a" / "mine.txt").write_text("added by hand")
    before = snapshot(exports)
    code, output = call("export_ckpt", [str(run_copy), "--out", str(exports / "a"), "--force"], capsys)
    assert_refused(code, output, "--out", str(exports / "a"), "mine.txt")
    assert snapshot(exports) == before
    assert sorted(p.name for p in exports.iterdir()) == ["a", "empty", "notes.txt"]  # no .tmp-* / .old-*


def test_rev_udm_export_refuses_a_directory_before_the_conversion(run_copy: Path, tmp_path: Path, capsys) -> None:
    """A directory ``--out`` for the one-file rev_udm layout used to fail with IsADirectoryError after the
    whole conversion; the tool and the library both refuse it first."""
    from udmtrain.interop.errors import InteropError
    from udmtrain.interop.exporter import export_reference

    out = tmp_path / "dir"
    out.mkdir()
    (out / "keep.txt").write_text("keep")
    code, output = call("export_ckpt", [str(run_copy), "--format", "rev_udm", "--out", str(out), "--force"], capsys)
    assert_refused(code, output, "--out", str(out), "is a directory")
    with pytest.raises(InteropError, match="is a directory; --format rev_udm writes one .ckpt file"):
        export_reference(run_copy, out, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    inside = run_copy / "x.ckpt"
    code, output = call("export_ckpt", [str(run_copy), "--format", "rev_udm", "--out", str(inside)], capsys)
    assert_refused(code, output, "--out", str(inside), "is inside the source")
    assert not inside.exists()


@pytest.mark.parametrize("where", ["file", "its_directory", "foreign"])
def test_import_never_replaces_its_source_or_a_foreign_directory(tmp_path: Path, where: str, capsys) -> None:
    """``import_ckpt.py src/x.ckpt --out src --force`` used to delete the source; a directory that is no
    earlier import (here: holding a note) is refused with what it holds."""
    src = tmp_path / "src"
    src.mkdir()
    ckpt = Path(shutil.copy(SOURCE, src / "mdlm.ckpt"))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not a run")
    out, why = {"file": (ckpt, "is the source"), "its_directory": (src, "contains the source"),
                "foreign": (foreign, "notes.txt")}[where]
    before = snapshot(tmp_path)
    code, output = call("import_ckpt", ["--from", "rev_udm", str(ckpt), "--out", str(out), "--tokenizer", "none",
                                        "--force"], capsys)
    assert_refused(code, output, "--out", str(out), why)
    assert snapshot(tmp_path) == before


def test_import_force_replaces_an_earlier_import_only(tmp_path: Path, capsys) -> None:
    """An empty directory and an earlier import are replaced (written beside --out, then renamed); an
    import that a file was added to is refused."""
    from udmtrain.train.inference import load_for_inference

    out = tmp_path / "run"
    out.mkdir()
    argv = ["--from", "rev_udm", str(SOURCE), "--out", str(out), "--tokenizer", "none", "--force"]
    assert call("import_ckpt", argv, capsys)[0] == 0
    first = load_for_inference(out, use_ema=False).model.state_dict()
    assert call("import_ckpt", argv, capsys)[0] == 0
    again = load_for_inference(out, use_ema=False).model.state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no .tmp-* / .old-* left beside it
    (out / "notes.txt").write_text("added by hand")
    before = snapshot(out)
    code, output = call("import_ckpt", argv, capsys)
    assert_refused(code, output, "--out", str(out), "notes.txt", "checkpoints/")
    assert snapshot(out) == before
