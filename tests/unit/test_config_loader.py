"""The recipe loader: YAML-1.2 scalars, origins, base inheritance, merge rules, overrides, load errors."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

from udmtrain.config import ConfigError
from udmtrain.config.loader import Tree, dump_yaml, load_tree, merge, parse_overrides, parse_yaml


def parse(text: str):
    issues = []
    tree = parse_yaml(text, "f.yaml", issues)
    assert not issues, issues
    return tree


@pytest.mark.parametrize("text, value", [
    ("3e-4", 3e-4), ("1e-4", 1e-4), ("1.0e-8", 1e-8), ("1e6", 1e6), ("1_000_000", 1_000_000), ("-7", -7),
    ("0x1f", 31), ("0o17", 15), ("2.5", 2.5), (".5", 0.5), ("+3", 3), ("1_000.5", 1000.5),
    ("yes", "yes"), ("no", "no"), ("on", "on"), ("off", "off"), ("y", "y"), ("n", "n"), ("Yes", "Yes"),
    ("true", True), ("False", False), ("null", None), ("~", None), ("", None),
    ("'3e-4'", "3e-4"), ('"true"', "true"), ("!!str 12", "12"), ("1.2.3", "1.2.3"), ("0755", 755),
    ("[0.9, 0.95]", [0.9, 0.95]), ("{a: 1}", {"a": 1}), ("abc", "abc"), ("2024-01-01", "2024-01-01"),
])
def test_yaml_12_scalars(text, value):
    got = parse(f"k: {text}\n").data["k"]
    assert got == value and type(got) is type(value)


def test_special_floats_and_origins():
    tree = parse("a: .inf\nb: -.Inf\nc: .nan\nd:\n  e: [1, 2]\n")
    assert tree.data["a"] == math.inf and tree.data["b"] == -math.inf and math.isnan(tree.data["c"])
    assert tree.origins["d.e"] == "f.yaml:5:6" and tree.origins["d.e[1]"] == "f.yaml:5:10"
    assert tree.key_origins["d.e"] == "f.yaml:5:3"


def test_dump_round_trips_strings_that_look_like_numbers():
    data = {"a": "3e-4", "b": "yes", "c": 1e-8, "d": [0.9, 0.999], "e": None, "f": "1_000", "g": "true",
            "h": "", "i": {"j": "null", "k": 12, "l": ".inf"}, "m": float("inf"), "n": "2024"}
    assert parse(dump_yaml(data)).data == data
    assert "b: yes\n" in dump_yaml(data)  # 'yes' is a plain string under YAML 1.2: no quotes needed
    assert "d: [0.9, 0.999]\n" in dump_yaml(data)


def test_duplicate_and_non_string_keys_are_issues():
    issues = []
    parse_yaml("a: 1\nb: 2\na: 3\n1: x\n", "f.yaml", issues)
    assert [(i.path, i.origin, i.message) for i in issues] == [
        ("a", "f.yaml:3:1", "duplicate key"), ("<top level>", "f.yaml:4:1", "keys must be non-empty strings, got 1")]
    assert issues[0].hint == "first set at f.yaml:1:1; keep one of them"


def test_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("run:\n  name: x\n   seed: 3\n")
    with pytest.raises(ConfigError) as info:
        load_tree(str(path))
    (issue,) = info.value.issues
    assert issue.origin.startswith(f"{path}:3:") and issue.message.startswith("YAML syntax error:")


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_tree(str(tmp_path / "nope.yaml"))
    assert info.value.issues[0].message == f"recipe file not found: {tmp_path / 'nope.yaml'}"
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="a recipe must be a mapping of sections"):
        load_tree(str(tmp_path / "list.yaml"))


def write(tmp_path: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)


def test_base_chain_left_to_right_relative_paths(tmp_path):
    write(tmp_path, {
        "base/a.yaml": "x: {p: 1, q: 1, l: [1, 2]}\nschedule: {name: one, k: 1}\n",
        "base/b.yaml": "base: a.yaml\nx: {q: 2}\n",
        "base/c.yaml": "x: {p: 3, l: [9]}\nschedule: {name: two}\n",
        "sub/r.yaml": "base: [../base/b.yaml, ../base/c.yaml]\nx: {r: 4}\n",
    })
    tree = load_tree(str(tmp_path / "sub/r.yaml"))
    # c overrides b (which extends a); lists replace; a changed component name replaces the section
    assert tree.data == {"x": {"p": 3, "q": 2, "l": [9], "r": 4}, "schedule": {"name": "two"}}
    assert tree.origins["x.q"].endswith("/base/b.yaml:2:8") and tree.origins["x.l[0]"].endswith("/base/c.yaml:1:15")
    assert "schedule.k" not in tree.origins and tree.origins["x.r"].endswith("/sub/r.yaml:2:8")


def test_same_component_name_deep_merges(tmp_path):
    write(tmp_path, {"a.yaml": "s: {name: one, k: 1, j: 2}\n", "r.yaml": "base: a.yaml\ns: {name: one, k: 5}\n"})
    assert load_tree(str(tmp_path / "r.yaml")).data == {"s": {"name": "one", "k": 5, "j": 2}}


def test_only_component_sections_are_replaced_on_a_name_change(tmp_path):
    # run.name is a plain field: changing it must not reset run.seed / run.output_root
    write(tmp_path, {"a.yaml": "run: {name: a, seed: 7, output_root: out}\nmodel: {name: dit, hidden_size: 8}\n",
                     "r.yaml": "base: a.yaml\nrun: {name: b}\nmodel: {name: ar_transformer}\n"})
    tree = load_tree(str(tmp_path / "r.yaml"), ["run.name=c"])
    assert tree.data["run"] == {"name": "c", "seed": 7, "output_root": "out"}
    assert tree.data["model"] == {"name": "ar_transformer"}


def test_base_cycle_names_the_chain(tmp_path):
    write(tmp_path, {"a.yaml": "base: b.yaml\n", "b.yaml": "base: a.yaml\n"})
    with pytest.raises(ConfigError) as info:
        load_tree(str(tmp_path / "a.yaml"))
    (issue,) = info.value.issues
    a, b = (os.path.relpath(tmp_path / n) for n in ("a.yaml", "b.yaml"))
    a, b = (p if not p.startswith("..") else str(tmp_path / n) for p, n in ((a, "a.yaml"), (b, "b.yaml")))
    assert issue.message == f"'base:' cycle: {a} -> {b} -> {a}"
    assert issue.origin.endswith("b.yaml:1:7")


def test_missing_base_points_at_the_base_key(tmp_path):
    write(tmp_path, {"r.yaml": "run: {}\nbase: [gone.yaml]\n"})
    with pytest.raises(ConfigError) as info:
        load_tree(str(tmp_path / "r.yaml"))
    (issue,) = info.value.issues
    assert issue.origin.endswith("r.yaml:2:7") and "recipe file not found" in issue.message
    assert issue.hint == "paths in 'base:' are relative to the file that names them"


def test_overrides_parse_like_files_and_merge_last(tmp_path):
    write(tmp_path, {"r.yaml": "optim: {name: adamw, lr: 1.0, betas: [0.1, 0.2]}\nrun: {name: a}\n"})
    tree = load_tree(str(tmp_path / "r.yaml"), ["optim.lr=1e-4", "optim.betas=[0.9,0.95]", "run.name=yes",
                                                 "train.max_steps=1_000", "optim.lr=2e-4"])
    assert tree.data["optim"] == {"name": "adamw", "lr": 2e-4, "betas": [0.9, 0.95]}
    assert tree.data["run"]["name"] == "yes" and tree.data["train"] == {"max_steps": 1000}
    assert tree.origins["optim.lr"] == "command line arg 5"
    assert tree.origins["optim.betas[1]"] == "command line arg 2"
    assert tree.key_origins["train.max_steps"] == "command line arg 4"


def test_bad_overrides_are_collected(tmp_path):
    write(tmp_path, {"r.yaml": "run: {}\n"})
    with pytest.raises(ConfigError) as info:
        load_tree(str(tmp_path / "r.yaml"), ["lr", "a..b=1", "c=[1,"])
    assert [(i.origin, i.message.split(":")[0]) for i in info.value.issues] == [
        ("command line arg 1", "expected a dotted override 'section.key=value', got 'lr'"),
        ("command line arg 2", "expected a dotted override 'section.key=value', got 'a..b=1'"),
        ("command line arg 3", "YAML syntax error")]


def test_merge_does_not_mutate_inputs():
    parent = Tree({"a": {"b": [1]}}, {"a.b": "p"}, {})
    child = Tree({"a": {"c": 2}}, {"a.c": "c"}, {})
    out = merge(parent, child)
    out.data["a"]["b"].append(5)
    assert parent.data == {"a": {"b": [1]}} and out.origins == {"a.b": "p", "a.c": "c"}
    assert parse_overrides(["a=1"], [])[0].data == {"a": 1}


def test_tool_flag_overrides_carry_their_flag_and_do_not_shift_the_users_numbers():
    """``sample.py --steps 2 sampler.k_paralel=3`` reported the user's only override as ``command line arg 2``."""
    from udmtrain.config.loader import FlagOverride, parse_overrides

    issues = []
    trees = parse_overrides([FlagOverride("sampler.num_steps=2", "--steps"), "sampler.top_p=0.9", "optim.lr=1e-4"],
                            issues)
    assert not issues
    assert [t.origins[next(iter(t.origins))] for t in trees] == ["option --steps", "command line arg 1",
                                                                "command line arg 2"]
    assert FlagOverride("a.b=1", "--x") == "a.b=1"  # still the plain override text everywhere else


@pytest.mark.parametrize("units,expected", [(True, "bf16"), (False, "fp32")])
def test_auto_precision_is_decided_once_when_the_recipe_is_loaded(monkeypatch, capsys, units, expected):
    """``engine.precision: auto`` -> bf16 with native bf16 units (CUDA with bf16, AVX512-BF16/AMX CPUs), else fp32;
    the RunConfig (what the engine, autocast, checkpoints and the resume check read) never says 'auto'."""
    from udmtrain.config import load_recipe
    from udmtrain.utils import precision

    REPO = Path(__file__).resolve().parents[2]
    monkeypatch.setattr(precision, "native_bf16", lambda: (units, "the probe's reason"))
    assert precision.resolve_precision("auto")[0] == expected and precision.resolve_precision("fp16") == ("fp16", None)
    cfg = load_recipe(str(REPO / "recipes" / "quickstart.yaml"))
    assert cfg.engine.precision == expected  # the quickstart recipes say auto
    assert f"engine.precision=auto -> {expected} (the probe's reason)" in capsys.readouterr().err  # said, once
    assert load_recipe(str(REPO / "recipes" / "quickstart.yaml"), ["engine.precision=bf16"]).engine.precision == "bf16"
