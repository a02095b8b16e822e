"""The README followed literally, as a new user would: on a copy of the repository, the set-up block
(``bash tools/quickstart.sh`` + activation) runs in one shell, then every later README block marked
``<!-- e2e -->`` runs, in order, in a fresh shell with a bare environment (no PYTHONPATH, PATH
without the virtualenv), on the demo data the quickstart built.

Kept within CI's budget by the quickstart's smoke mode (``QUICKSTART_STEPS=2``: every run trains
two steps, gen_ppl draws 4 samples); the commands after it are the README's own, unchanged. The
copy's ``.venv`` is a link to the environment running the tests (its ``bin/activate`` is what the
README sources), so nothing is installed. About 3-5 minutes on 2 idle CPU cores.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MARK = "<!-- e2e"
SMOKE_STEPS = 2


def readme_blocks(text: str) -> list[str]:
    """The ```bash blocks that directly follow a ``<!-- e2e`` comment line, in README order."""
    lines, blocks, i = text.splitlines(), [], 0
    while i < len(lines):
        if lines[i].startswith(MARK):
            start = next(j for j in range(i + 1, len(lines)) if lines[j].strip())
            assert lines[start].strip() == "```bash", f"README line {start + 1}: an e2e mark must precede a bash block"
            end = next(j for j in range(start + 1, len(lines)) if lines[j].strip() == "```")
            blocks.append("\n".join(lines[start + 1:end]))
            i = end
        i += 1
    return blocks


def copy_repository(dest: Path) -> None:
    """The files a fresh clone has: git's tracked and untracked-but-not-ignored files (no runs/, data/)."""
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-co", "--exclude-standard", "-z"],
                            capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout: cannot tell a fresh clone's files")
    for rel in filter(None, listed.stdout.split("\0")):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def bare_env(home: Path) -> dict[str, str]:
    """A new login's environment: no virtualenv on PATH, no PYTHONPATH; only caches are shared."""
    env = {"HOME": str(home), "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "TERM": "dumb",
           "UDMTRAIN_PROGRESS_INTERVAL": "5",
           # a cache only (the JIT-built DeepSpeed op), so the fresh shell does not rebuild it for a minute
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))}
    return env


def shell(script: str, cwd: Path, env: dict[str, str], timeout: int) -> subprocess.CompletedProcess:
    proc = subprocess.run(["bash", "-c", "set -eo pipefail\n" + script], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"README commands exited {proc.returncode}:\n{script}\n--- stdout:\n{proc.stdout[-4000:]}"
                             f"\n--- stderr:\n{proc.stderr[-6000:]}")
    return proc


def test_readme_blocks_are_found():
    blocks = readme_blocks((REPO / "README.md").read_text(encoding="utf-8"))
    assert len(blocks) >= 2 and "bash tools/quickstart.sh" in blocks[0]
    assert all("source .venv/bin/activate" in b for b in blocks[:2])
    later = "\n".join(blocks[1:])
    for tool in ("eval_ppl.py", "sample.py", "gen_ppl.py", "--sweep", "loo_probe.py", "export_ckpt.py",
                 "inspect_ckpt.py"):
        assert tool in later, f"the README's e2e blocks no longer run {tool}"
    assert "--judge" in later  # offline judge shown wherever gen_ppl is


def test_readme_after_quickstart_in_a_fresh_shell(tmp_path):
    venv = Path(sys.prefix)
    if not (venv / "bin" / "activate").is_file():
        pytest.skip(f"{venv} is not a virtualenv (no bin/activate to stand in for the quickstart's .venv)")
    repo = tmp_path / "udmtrain"
    copy_repository(repo)
    (repo / ".venv").symlink_to(venv, target_is_directory=True)
    home = tmp_path / "home"
    home.mkdir()
    setup, *after = readme_blocks((repo / "README.md").read_text(encoding="utf-8"))

    first = shell(setup, repo, {**bare_env(home), "QUICKSTART_STEPS": str(SMOKE_STEPS)}, timeout=900)
    system_python_has_all = subprocess.run(["bash", "-c", "python3 -c 'import torch, deepspeed' && command -v deepspeed"],
                                           env=bare_env(home), capture_output=True).returncode == 0
    if not system_python_has_all:  # the quickstart used .venv: it must say how to reach it
        assert "source .venv/bin/activate" in first.stdout
    assert "=== done in" in first.stdout and "smoke test" in first.stdout
    for run in ("quickstart-audm", "quickstart-ar", "quickstart-udlm"):
        meta = json.loads((repo / "runs" / run / "checkpoints" / f"step_{SMOKE_STEPS:010d}" / "meta.json").read_text())
        assert meta["step"] == SMOKE_STEPS

    second = shell("\n".join(after), repo, bare_env(home), timeout=900)  # a fresh shell: activation is in the block
    out = repo / "runs"
    ev = json.loads((out / "quickstart-audm" / "eval.json").read_text())
    assert math.isfinite(ev["results"][0]["nll"]) and ev["step"] == SMOKE_STEPS
    gen = json.loads((out / "quickstart-audm" / "gen.json").read_text())
    assert gen["num_samples"] == 8 and gen["judge"]["kind"] == "udmtrain_ar" and math.isfinite(gen["gen_ppl"])
    with open(out / "quickstart-udlm" / "frontier" / "frontier.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 4  # temperature x steps
    assert sorted(p.name.split("_")[0] for p in (out / "quickstart-udlm" / "frontier" / "reports").iterdir()) == \
        ["steps16", "steps16", "steps8", "steps8"]
    probe = json.loads((out / "quickstart-udlm" / "probe" / "probe.json").read_text())
    assert len(probe["curve"]) >= 8
    assert (repo / "exports" / "quickstart-audm" / "model.pt").is_file()
    assert len(list((out / "quickstart-audm" / "samples").glob("*.jsonl"))) == 1
    assert len(list((repo / "exports" / "samples").glob("quickstart-audm-*.jsonl"))) == 1  # beside the export
    # long steps report progress off a terminal: status lines with a rate
    assert "udmtrain: sampling" in second.stderr and ("nfe/s" in second.stderr or "s/nfe" in second.stderr)
