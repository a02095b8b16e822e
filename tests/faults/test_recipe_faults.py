"""Recipe faults: ``--dry-run`` rejects everything construction rejects, and no recipe runs code.

Each case runs ``launch/pretrain.py --dry-run`` in-process (its ``main``) and expects exit 2 with the
report naming the key (and its file:line or command-line argument), without a traceback.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from fault_helpers import REPO, assert_refused, run

QUICKSTART = str(REPO / "recipes" / "quickstart.yaml")


def pretrain_main(argv: list[str], capsys) -> tuple[int, str]:
    if "udmtrain_launch_pretrain" not in sys.modules:
        spec = importlib.util.spec_from_file_location("udmtrain_launch_pretrain", REPO / "launch" / "pretrain.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["udmtrain_launch_pretrain"] = module
        spec.loader.exec_module(module)
    try:
        code = sys.modules["udmtrain_launch_pretrain"].main(argv)
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out + captured.err


CONSTRUCTION = [  # (override, key the report must name)
    ("optim.lr=-1", "optim.lr"), ("optim.lr=.nan", "optim.lr"), ("optim.lr=0", "optim.lr"),
    ("lr_schedule={name: cosine, warmup_steps: 1000}", "lr_schedule.warmup_steps"),
    ("sampler.temperature=0", "sampler.temperature"), ("sampler.top_p=0", "sampler.top_p"),
    ("sampler.top_p=1.5", "sampler.top_p"), ("sampler.num_steps=0", "sampler.num_steps"),
    ("model.noise_conditioning=none", "model.noise_conditioning"),
    ("run.name=../escape", "run.name"), ("run.name=/tmp/abs", "run.name"), ("run.name=a/b", "run.name"),
    ("run.seed=-1", "run.seed"), ("run.seed=18446744073709551616", "run.seed"),  # died in the data loader
    ("engine.deepspeed_extra={zero_optimization: {bogus_key: 1}}", "engine.deepspeed_extra"),  # pydantic traceback
    ("engine.deepspeed_extra={zero_optimization: {overlap_comm: maybe}}", "engine.deepspeed_extra"),
]


@pytest.mark.parametrize("override,key", CONSTRUCTION)
def test_dry_run_rejects_what_construction_rejects(override: str, key: str, capsys) -> None:
    code, out = pretrain_main(["--recipe", QUICKSTART, "--dry-run", override], capsys)
    line = assert_refused(code, out, "command line arg 1", key)
    assert line.strip().startswith("command line arg 1")


def test_masked_process_with_noise_conditioning(capsys) -> None:
    code, out = pretrain_main(["--recipe", str(REPO / "recipes" / "mdlm.yaml"), "--dry-run",
                               "model.noise_conditioning=separate_linear"], capsys)
    assert_refused(code, out, "command line arg 1", "model.noise_conditioning")


def test_cosine_hint_names_real_keys(capsys) -> None:
    code, out = pretrain_main(["--recipe", QUICKSTART, "--dry-run", "lr_schedule={name: cosine, warmup_steps: 1000}"],
                              capsys)
    assert_refused(code, out, "lr_schedule.warmup_steps", "lr_schedule.decay_steps")
    assert "optim.lr_schedule" not in out


def test_shell_url_needs_opt_in_and_never_runs(tmp_path: Path, capsys) -> None:
    marker = tmp_path / "ran"
    code, out = pretrain_main(["--recipe", QUICKSTART, f"data.train_shards=pipe:touch {marker}"], capsys)
    assert_refused(code, out, "data.train_shards")
    assert "data.allow_shell_urls" in out and not marker.exists()


BAD_FILES = {
    "latin1": (b"run:\n  name: caf\xe9\n", "not UTF-8"),
    "binary": (b"\x7fELF\x02\x01\x01\x00\x00\x00\xff\xfe", "binary"),
    "anchor": (b"run: &a\n  nested: *a\n", "self-referencing"),
    "deep": (("a: " + "[" * 3000 + "]" * 3000 + "\n").encode(), "deep"),
    "deep_mapping": (("".join(f"{'  ' * i}k{i}:\n" for i in range(100)) + "  " * 100 + "x: 1\n").encode(), "deep"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_unreadable_recipe_files(case: str, tmp_path: Path, capsys) -> None:
    content, words = BAD_FILES[case]
    recipe = tmp_path / f"{case}.yaml"
    recipe.write_bytes(content)
    code, out = pretrain_main(["--recipe", str(recipe), "--dry-run"], capsys)
    assert_refused(code, out, words)
    assert f"{case}.yaml" in out


def test_empty_recipe_flag(capsys) -> None:
    code, out = pretrain_main(["--recipe=", "--dry-run"], capsys)
    assert_refused(code, out, "--recipe")


def test_real_process_output_for_a_bad_value() -> None:
    """As a user sees it: exit status 2, the key with its origin, no traceback on stderr."""
    proc = run(["launch/pretrain.py", "--recipe", QUICKSTART, "--dry-run", "optim.lr=-1"], timeout=120)
    assert_refused(proc.returncode, proc.stderr, "command line arg 1", "optim.lr")
    assert proc.stdout == ""


def test_dry_run_refuses_a_position_table_shorter_than_the_sequence(capsys) -> None:
    code, out = pretrain_main(["--recipe", QUICKSTART, "--dry-run", "model.learned_positions=100"], capsys)
    line = assert_refused(code, out, "command line arg 1", "model.learned_positions")
    assert "model.learned_positions >= 128" in out, line


def test_deepspeed_extra_report_names_the_rejected_key(capsys) -> None:
    """DeepSpeed's schema is checked in the dry run (only when deepspeed_extra adds keys), per rejected field."""
    code, out = pretrain_main(["--recipe", QUICKSTART, "--dry-run",
                               "engine.deepspeed_extra={zero_optimization: {bogus_key: 1, overlap_comm: maybe}}"], capsys)
    assert_refused(code, out, "DeepSpeed's config schema", "bogus_key: Extra inputs", ".overlap_comm: Input should be")
    code, out = pretrain_main(["--recipe", QUICKSTART, "--dry-run", "engine.deepspeed_extra={steps_per_print: 5}"],
                              capsys)
    assert code == 0, out[-2000:]


def test_flash_backend_without_flash_attn_is_a_report_not_a_traceback(capsys) -> None:
    from udmtrain.utils.optional import available

    if available("flash_attn")[0]:
        pytest.skip("flash_attn is installed here")
    code, out = pretrain_main(["--recipe", QUICKSTART, "--dry-run", "model.attn_backend=flash"], capsys)
    assert_refused(code, out, "command line arg 1", "model.attn_backend")
    assert "pip install 'udmtrain[gpu]'" in out
