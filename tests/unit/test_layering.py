"""Import layering of udmtrain (docs/design.md §4) and single owners of optional heavy dependencies.

Layers: L0 utils; L1 registry, config; L2 diffusion, models, data (siblings never import each other);
L3 engine; L4 eval; L5 train, interop. A module may import its own or lower layers only. The registry's lazy
import of component modules is a table of strings (``FAMILY_MODULES``), not an import, so it is not seen.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "udmtrain"

LAYERS: dict[str, int] = {
    "utils": 0, "registry": 1, "config": 1, "diffusion": 2, "models": 2, "data": 2,
    "engine": 3, "eval": 4, "train": 5, "interop": 5,
}
L2 = {name for name, layer in LAYERS.items() if layer == 2}

# optional dependency -> the only modules allowed to import it
OWNERS: dict[str, set[str]] = {
    "flash_attn": {"udmtrain/models/attention.py"},
    "deepspeed": {"udmtrain/engine/deepspeed_engine.py"},
    "webdataset": {"udmtrain/data/webdataset.py"},
    "wandb": {"udmtrain/train/metrics.py"},
    "transformers": {"udmtrain/eval/gen_ppl.py", "udmtrain/data/tokenizers.py"},
}
# functions that import a module named by a string argument
DYNAMIC_IMPORTERS = {"import_module", "__import__", "require", "available", "find_spec"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> list[tuple[str, int]]:
    """Absolute module names imported anywhere in ``path`` (inside functions too), with line numbers."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "udmtrain":  # `from udmtrain import config`: the names are the packages
                found += [(f"{target}.{alias.name}", node.lineno) for alias in node.names]
            else:
                found.append((target, node.lineno))
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in DYNAMIC_IMPORTERS and node.args and isinstance(node.args[0], ast.Constant) \
                    and isinstance(node.args[0].value, str):
                found.append((node.args[0].value, node.lineno))
    return found


def layer_key(module: str) -> str | None:
    """``udmtrain.diffusion.schedule`` -> ``diffusion``; None for the top package and non-udmtrain."""
    parts = module.split(".")
    if parts[0] != "udmtrain" or len(parts) < 2:
        return None
    return parts[1] if parts[1] in LAYERS else None


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_every_package_is_in_a_layer():
    unknown = {p.relative_to(PACKAGE).parts[0] for p in SOURCES if len(p.relative_to(PACKAGE).parts) > 1}
    unknown |= {p.stem for p in SOURCES if len(p.relative_to(PACKAGE).parts) == 1} - {"__init__"}
    assert unknown <= set(LAYERS), f"add {sorted(unknown - set(LAYERS))} to LAYERS (and docs/design.md §4)"


def violations() -> list[str]:
    out = []
    for path in SOURCES:
        rel = path.relative_to(ROOT).as_posix()
        own = layer_key(module_name(path))
        for target, line in imports_of(path):
            top = target.split(".")[0]
            for dep, owners in OWNERS.items():
                if top == dep and rel not in owners:
                    out.append(f"{rel}:{line} imports {dep}; only {', '.join(sorted(owners))} may")
            other = layer_key(target)
            if other is None or own is None or other == own:
                continue
            if LAYERS[other] > LAYERS[own]:
                out.append(f"{rel}:{line} (L{LAYERS[own]} {own}) imports {target} (L{LAYERS[other]} {other})")
            elif own in L2 and other in L2:
                out.append(f"{rel}:{line} imports sibling L2 package {target}")
    return out


def test_import_layers_and_optional_dependency_owners():
    problems = violations()
    assert not problems, "layering violations:\n" + "\n".join(problems)


def test_top_level_package_imports_nothing_heavy():
    imported = {t.split(".")[0] for t, _ in imports_of(PACKAGE / "__init__.py")}
    assert imported <= {"__future__", "udmtrain"}, imported


@pytest.mark.parametrize("source, expected", [
    ("from udmtrain.train import trainer\n", "imports udmtrain.train (L5 train)"),
    ("from ..models import dit\n", "imports sibling L2 package udmtrain.models"),
    ("import deepspeed\n", "imports deepspeed; only udmtrain/engine/deepspeed_engine.py may"),
    ("def f():\n    importlib.import_module('wandb')\n", "imports wandb"),
    ("from udmtrain import engine\n", "imports udmtrain.engine (L3 engine)"),
])
def test_checker_catches_violations(tmp_path, monkeypatch, source, expected):
    """The checker itself: a planted bad import in a diffusion module is reported."""
    fake = tmp_path / "udmtrain" / "diffusion" / "bad.py"
    fake.parent.mkdir(parents=True)
    fake.write_text(source)
    globals_ = globals()
    monkeypatch.setitem(globals_, "ROOT", tmp_path)
    monkeypatch.setitem(globals_, "SOURCES", [fake])
    problems = violations()
    assert len(problems) == 1 and expected in problems[0], problems
