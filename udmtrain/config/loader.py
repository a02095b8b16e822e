"""Recipe files -> one plain dict plus the origin (``file:line:col``) of every value.

* YAML-1.2 core-schema scalars (not PyYAML's 1.1 defaults): ``3e-4``, ``1e-4`` and ``1_000_000`` are
  numbers; only ``true``/``false`` are booleans (``yes/no/on/off/y/n`` stay strings); ``null``, ``~``
  and an empty value are null. Quoted scalars are always strings.
* ``base:`` names one file or a list of files, relative to the file that names them; bases apply left
  to right, then the file itself. A cycle is an error naming the chain.
* Merge (docs/design.md §5): mappings deep-merge, lists and scalars replace, and a mapping whose
  ``name`` changes is *replaced*, so a parent's component settings never leak into another component.
* Command-line overrides ``a.b=value`` are parsed with the same scalar rules (``[0.9,0.95]`` is a
  list) and merged last, left to right, with origin ``command line arg N``.

Loading problems (missing file, YAML syntax, duplicate keys, bad ``base:``) become ``ConfigIssue``s.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterable, Sequence
from typing import Any

import yaml

from udmtrain.config.errors import ConfigError, ConfigIssue
from udmtrain.config.schema import COMPONENT_SECTIONS

STR, INT, FLOAT, BOOL, NULL = (f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null"))
SEQ, MAP = "tag:yaml.org,2002:seq", "tag:yaml.org,2002:map"

# YAML 1.2 core schema, plus '_' digit separators in decimal ints and floats (1_000_000).
_NULL_RE = re.compile(r"^(?:~|null|Null|NULL|)$")
_BOOL_RE = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_INT_RE = re.compile(r"^(?:[-+]?[0-9](?:_?[0-9])*|0o[0-7]+|0x[0-9a-fA-F]+)$")
_FLOAT_RE = re.compile(
    r"^(?:[-+]?(?:\.[0-9]+|[0-9](?:_?[0-9])*(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
)
_DIGITS = list("-+0123456789.")


def _install_yaml12_resolvers(cls: type) -> type:
    """Replace PyYAML's YAML-1.1 implicit resolvers on ``cls`` by the 1.2 core ones above."""
    cls.yaml_implicit_resolvers = {}
    cls.add_implicit_resolver(NULL, _NULL_RE, ["~", "n", "N", ""])
    cls.add_implicit_resolver(BOOL, _BOOL_RE, list("tTfF"))
    cls.add_implicit_resolver(INT, _INT_RE, _DIGITS)
    cls.add_implicit_resolver(FLOAT, _FLOAT_RE, _DIGITS + ["."])
    return cls


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML-1.2 scalar resolution; used only through ``yaml.compose``."""


class _Dumper(yaml.SafeDumper):
    """SafeDumper that quotes exactly the strings our 1.2 loader would read as non-strings."""


_install_yaml12_resolvers(_Loader)
_install_yaml12_resolvers(_Dumper)


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    """Lists of scalars in flow style (``betas: [0.9, 0.999]``), others in block style."""
    flat = all(not isinstance(v, (list, tuple, dict)) for v in data)
    return dumper.represent_sequence(SEQ, data, flow_style=flat)


_Dumper.add_representer(list, _represent_list)
_Dumper.add_representer(tuple, _represent_list)


def dump_yaml(data: Any) -> str:
    """Serialise plain data so that ``load`` reads it back identically (block style, key order kept)."""
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=100)


@dataclasses.dataclass
class Tree:
    """A plain nested dict with the origin of each value and of each key, by dotted path.

    List elements have paths like ``optim.betas[1]``.
    """

    data: dict[str, Any]
    origins: dict[str, str] = dataclasses.field(default_factory=dict)
    """Where each value was written (points at the value)."""
    key_origins: dict[str, str] = dataclasses.field(default_factory=dict)
    """Where each key was written (points at the key; used for unknown-key messages)."""


def _mark(path: str, node: yaml.Node) -> str:
    return f"{path}:{node.start_mark.line + 1}:{node.start_mark.column + 1}"


def _scalar(node: yaml.ScalarNode) -> Any:
    """Python value of a scalar node under the 1.2 rules (explicit ``!!tags`` honoured)."""
    text = node.value
    if node.tag == NULL:
        return None
    if node.tag == BOOL:
        return text.lower() == "true"
    if node.tag == INT:
        if text.startswith(("0o", "0x")):
            return int(text, 0)
        return int(text.replace("_", ""))
    if node.tag == FLOAT:
        low = text.lower()
        if low.endswith(".inf"):
            return float("-inf") if low.startswith("-") else float("inf")
        if low == ".nan":
            return float("nan")
        return float(text.replace("_", ""))
    return text


class _Builder:
    """Turn a composed node tree into a ``Tree``, collecting issues instead of raising."""

    MAX_DEPTH = 64
    """Deeper nesting is refused: no recipe needs it, and it would exhaust Python's recursion limit."""

    def __init__(self, source: str, issues: list[ConfigIssue]):
        self.source, self.issues = source, issues
        self.tree = Tree({})
        self._open: set[int] = set()  # nodes being built: an alias back to one of them is a cycle

    def value(self, node: yaml.Node, path: str) -> Any:
        if id(node) in self._open or path.count(".") + path.count("[") >= self.MAX_DEPTH:
            cycle = id(node) in self._open
            self.issues.append(ConfigIssue(
                path.split("[")[0].rsplit(".", 1)[0] if path else "", _mark(self.source, node),
                "a YAML alias refers to a mapping that contains it (self-referencing anchor)" if cycle
                else f"nested more than {self.MAX_DEPTH} levels deep",
                "write the values out instead of the alias" if cycle else "flatten the structure"))
            return None
        self._open.add(id(node))
        try:
            return self._value(node, path)
        finally:
            self._open.discard(id(node))

    def _value(self, node: yaml.Node, path: str) -> Any:
        self.tree.origins[path] = _mark(self.source, node)
        if isinstance(node, yaml.MappingNode):
            out: dict[str, Any] = {}
            for key_node, value_node in node.value:
                key = _scalar(key_node) if isinstance(key_node, yaml.ScalarNode) else None
                if not isinstance(key, str) or not key:
                    self.issues.append(ConfigIssue(
                        path or "<top level>", _mark(self.source, key_node),
                        f"keys must be non-empty strings, got {key!r}", "quote the key"))
                    continue
                child = f"{path}.{key}" if path else key
                if key in out:
                    self.issues.append(ConfigIssue(
                        child, _mark(self.source, key_node), "duplicate key",
                        f"first set at {self.tree.key_origins[child]}; keep one of them"))
                    continue
                self.tree.key_origins[child] = _mark(self.source, key_node)
                out[key] = self.value(value_node, child)
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self.value(item, f"{path}[{i}]") for i, item in enumerate(node.value)]
        return _scalar(node)


def parse_yaml(text: str, source: str, issues: list[ConfigIssue], prefix: str = "") -> Tree | None:
    """Parse one YAML document; ``None`` (and an issue) on a syntax error.

    ``prefix`` roots the paths (used for command-line values); ``source`` names the origin.
    """
    try:
        node = yaml.compose(text, Loader=_Loader)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        at_line = mark is not None and not source.startswith("command line")
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if at_line else source
        problem = " ".join(str(p) for p in (err.context, err.problem) if p)
        issues.append(ConfigIssue("", where, f"YAML syntax error: {problem}",
                                  "check indentation, colons and quotes around this line"))
        return None
    except yaml.YAMLError as err:  # e.g. a bad character outside any mark
        issues.append(ConfigIssue("", source, f"YAML error: {err}".splitlines()[0]))
        return None
    except RecursionError:  # the composer recurses once per nesting level
        issues.append(ConfigIssue("", source, "YAML nested too deeply to read", "flatten the structure"))
        return None
    builder = _Builder(source, issues)
    builder.tree.data = builder.value(node, prefix) if node is not None else None  # type: ignore[assignment]
    return builder.tree


def _drop_prefix(table: dict[str, str], path: str) -> None:
    for key in [k for k in table if k == path or k.startswith(path + ".") or k.startswith(path + "[")]:
        del table[key]


def _copy_prefix(src: dict[str, str], dst: dict[str, str], path: str) -> None:
    for key, value in src.items():
        if key == path or key.startswith(path + ".") or key.startswith(path + "["):
            dst[key] = value


def merge(parent: Tree, child: Tree) -> Tree:
    """``child`` over ``parent`` (docs/design.md §5 merge rules); returns a new Tree."""
    out = Tree(_deepcopy(parent.data), dict(parent.origins), dict(parent.key_origins))

    def go(dst: dict[str, Any], src: dict[str, Any], path: str) -> None:
        for key, value in src.items():
            child_path = f"{path}.{key}" if path else key
            old = dst.get(key)
            # Only a component section (model, process, ...) is replaced when its ``name`` changes;
            # ``run.name`` is an ordinary field and merges like any other.
            same_component = not (
                not path and key in COMPONENT_SECTIONS
                and isinstance(old, dict) and isinstance(value, dict)
                and "name" in value and "name" in old and value["name"] != old["name"])
            if isinstance(old, dict) and isinstance(value, dict) and same_component:
                out.key_origins[child_path] = child.key_origins.get(child_path, out.key_origins.get(child_path, ""))
                go(old, value, child_path)
            else:
                _drop_prefix(out.origins, child_path)
                _drop_prefix(out.key_origins, child_path)
                dst[key] = _deepcopy(value)
                _copy_prefix(child.origins, out.origins, child_path)
                _copy_prefix(child.key_origins, out.key_origins, child_path)

    go(out.data, child.data, "")
    return out


def _deepcopy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deepcopy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deepcopy(v) for v in value]
    return value


def display_path(path: str) -> str:
    """A path as the user should see it: relative to the working directory when that is shorter."""
    if not path:
        return "''"
    rel = os.path.relpath(path)
    return rel if not rel.startswith("..") else os.path.normpath(path)


def load_file(path: str, issues: list[ConfigIssue], _chain: tuple[str, ...] = (),
              _named_at: str | None = None) -> Tree:
    """Load ``path`` and its ``base:`` chain into one merged Tree (issues appended, never raised)."""
    real = os.path.realpath(path)
    shown = display_path(path)
    if real in _chain:
        names = " -> ".join(display_path(p) for p in (*_chain, real))
        issues.append(ConfigIssue("base", _named_at or shown, f"'base:' cycle: {names}",
                                  "remove one of these 'base:' entries"))
        return Tree({})
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except UnicodeDecodeError as err:
        binary = b"\0" in err.object
        issues.append(ConfigIssue("base" if _named_at else "", _named_at or shown,
                                  f"{shown} is {'a binary file' if binary else 'not UTF-8 text'} (byte "
                                  f"0x{err.object[err.start]:02x} at offset {err.start})",
                                  "a recipe is a YAML text file" if binary else "save the file as UTF-8"))
        return Tree({})
    except FileNotFoundError:
        issues.append(ConfigIssue("base" if _named_at else "", _named_at or shown,
                                  f"recipe file not found: {shown}",
                                  "paths in 'base:' are relative to the file that names them"
                                  if _named_at else "check the --recipe path"))
        return Tree({})
    except OSError as err:
        issues.append(ConfigIssue("", _named_at or shown, f"cannot read {shown}: {err.strerror}"))
        return Tree({})
    tree = parse_yaml(text, shown, issues)
    if tree is None:
        return Tree({})
    if tree.data is None:
        tree.data = {}
    if not isinstance(tree.data, dict):
        issues.append(ConfigIssue("", f"{shown}:1:1", "a recipe must be a mapping of sections",
                                  "start with e.g. 'base: base/pretrain.yaml' or 'run:'"))
        return Tree({})
    bases = tree.data.pop("base", None)
    base_origin = tree.origins.get("base", shown)
    _drop_prefix(tree.origins, "base")
    _drop_prefix(tree.key_origins, "base")
    merged = Tree({})
    if bases is not None:
        if isinstance(bases, str):
            bases = [bases]
        if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
            issues.append(ConfigIssue("base", base_origin, "'base:' must be a file path or a list of paths"))
            bases = []
        for i, base in enumerate(bases):
            at = tree.origins.get(f"base[{i}]", base_origin) if len(bases) > 1 else base_origin
            base_path = os.path.join(os.path.dirname(path), base)
            merged = merge(merged, load_file(base_path, issues, (*_chain, real), at))
    return merge(merged, tree)


_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*$")


class FlagOverride(str):
    """An override a tool derives from one of its own flags (``--steps 8`` -> ``sampler.num_steps=8``):
    reported with that flag as its origin, and not counted in the user's ``command line arg N``."""

    origin: str

    def __new__(cls, text: str, flag: str) -> "FlagOverride":
        item = super().__new__(cls, text)
        item.origin = f"option {flag}"
        return item


def parse_overrides(overrides: Sequence[str], issues: list[ConfigIssue], first_arg: int = 1) -> list[Tree]:
    """``["optim.lr=1e-4", ...]`` -> one single-key Tree per override (origin ``command line arg N``).

    ``N`` counts the user's overrides from ``first_arg`` (a :class:`FlagOverride` carries its own origin
    and is not counted); the value is parsed with the YAML-1.2 scalar rules.
    """
    trees = []
    number = first_arg
    for item in overrides:
        origin = getattr(item, "origin", None)
        if origin is None:
            origin, number = f"command line arg {number}", number + 1
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not _KEY_RE.match(key):
            issues.append(ConfigIssue(key if _KEY_RE.match(key) else "", origin,
                                      f"expected a dotted override 'section.key=value', got {item!r}",
                                      "e.g. optim.lr=1e-4 or engine.zero_stage=3"))
            continue
        parsed = parse_yaml(raw, origin, issues)
        if parsed is None:
            continue
        value = parsed.data
        node_origins = {f"{key}{p[len(''):]}" if p.startswith("[") else (f"{key}.{p}" if p else key): origin
                        for p in parsed.origins}
        node_origins[key] = origin
        parts = key.split(".")
        data: dict[str, Any] = {}
        cursor = data
        for part in parts[:-1]:
            cursor[part] = {}
            cursor = cursor[part]
        cursor[parts[-1]] = value
        key_origins = {".".join(parts[: j + 1]): origin for j in range(len(parts))}
        key_origins.update({p: origin for p in node_origins})
        trees.append(Tree(data, node_origins, key_origins))
    return trees


def load_tree(path: str, overrides: Iterable[str] = ()) -> Tree:
    """The resolved (merged, overridden) recipe tree, or ``ConfigError`` listing every loading issue."""
    issues: list[ConfigIssue] = []
    tree = load_file(path, issues)
    for override in parse_overrides(list(overrides), issues):
        tree = merge(tree, override)
    if issues:
        raise ConfigError(issues, display_path(path))
    return tree
