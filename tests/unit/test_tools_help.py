"""Every entry point explains itself: ``--help`` exits 0 with a description and example commands.

In-process (each tool's ``main(["--help"])``), so the whole set costs no interpreter start-ups."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# every script of tools/ with a ``__main__`` block (tools/bench_bare.py, a module of tools/bench.py, has one
# that says so and names the command that uses it)
ENTRY_POINTS = sorted(str(p.relative_to(REPO)) for p in (REPO / "tools").glob("*.py")
                      if '__name__ == "__main__"' in p.read_text(encoding="utf-8")) + ["launch/pretrain.py"]


def load(entry: str):
    spec = importlib.util.spec_from_file_location(f"entry_{Path(entry).stem}", REPO / entry)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses defined in a tool look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_help_explains_the_entry_point(entry, capsys):
    main = load(entry).main
    try:
        code = main(["--help"])
    except SystemExit as exit_:  # argparse's --help
        code = exit_.code
    assert code in (0, None)
    text = capsys.readouterr().out
    assert len(text.splitlines()) >= 8, f"{entry} --help says too little:\n{text}"
    assert "python " in text or "deepspeed " in text, f"{entry} --help shows no example command"
    assert "unknown option" not in text
