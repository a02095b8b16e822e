"""Type coercion of recipe values (docs/design.md §5), shared by the validator and the docs generator.

``coerce(value, annotation)`` returns the converted value or raises ``_Bad(message, hint)``; the
rules are listed in ``COERCION_RULES`` (printed in docs/recipes.md).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, Union

COERCION_RULES: tuple[str, ...] = (
    "`int` accepts integers and integral floats (`1e6`, `1_000_000`); rejects `true`/`false` and "
    "fractional values (`1.5`).",
    "`float` accepts integers and floats (`3e-4` is a float: YAML-1.2 rules, no dot needed).",
    "`bool` accepts only `true` / `false`; `yes`, `no`, `on`, `off`, `y`, `n` stay strings and are "
    "rejected.",
    "`str` rejects numbers and booleans: quote them (`name: '2024'`).",
    "a choice (`one of ...`) must be one of the listed strings; a near miss gets a did-you-mean.",
    "lists check every element; fixed-length tuples (`betas: [0.9, 0.999]`) also check the length.",
    "`null` (or `~`, or an empty value) is accepted only where the type says `or null`.",
    "a mapping is accepted only where the type is a mapping (`engine.deepspeed_extra`).",
)


class _Bad(Exception):
    """A type/coercion problem of one value: message and optional hint."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message, self.hint = message, hint


_MISSING = object()


def show(value: Any) -> str:
    """A value as the user typed it (YAML spelling): 'abc', 1.5, true, null, [1, 2]."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {show(v)}" for k, v in value.items()) + "}"
    return repr(value)


def yaml_type(value: Any) -> str:
    """YAML-level type name of a loaded value."""
    if value is None:
        return "null"
    return {bool: "bool", int: "int", float: "float", str: "str", list: "list", dict: "mapping"}.get(
        type(value), type(value).__name__)


def type_name(tp: Any) -> str:
    """Human name of an annotation: ``int or null``, ``one of 'fp32', 'bf16'``, ``list of float``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return "any"
    if tp is type(None):
        return "null"
    if origin is Literal:
        return "one of " + ", ".join(show(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in args)
    if origin in (list, tuple):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"list of {len(args)} ({', '.join(type_name(a) for a in args)})"
        return f"list of {type_name(args[0])}" if args else "list"
    if origin in (dict, Mapping) or tp in (dict, Mapping):
        return "mapping"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def suggest(word: str, candidates: typing.Iterable[str]) -> str | None:
    """The closest candidate (difflib), or None."""
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return close[0] if close else None


def coerce(value: Any, tp: Any) -> Any:
    """``value`` converted to annotation ``tp`` under the coercion rules, or ``_Bad``.

    Nested dataclass types are not handled here (``_Checker.dataclass`` does them with paths).
    """
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    got = f"got {show(value)} ({yaml_type(value)})"
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise _Bad(f"expected {type_name(tp)}, got null")
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg)
            except _Bad as bad:
                errors.append(bad)
        if len(errors) == 1:
            raise errors[0]
        raise _Bad(f"expected {type_name(tp)}, {got}")
    if value is None:
        raise _Bad(f"expected {type_name(tp)}, got null", "null is allowed only where the type says 'or null'")
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        close = suggest(str(value), [str(a) for a in args]) if isinstance(value, str) else None
        msg = f"{show(value)} is not an allowed value"
        raise _Bad(msg + (f"; did you mean {close!r}?" if close else ""),
                   "allowed: " + ", ".join(str(a) for a in args))
    if tp is bool:
        if isinstance(value, bool):
            return value
        hint = "write true or false (yes/no/on/off are strings)" if isinstance(value, str) else None
        raise _Bad(f"expected bool, {got}", hint)
    if tp is int:
        if isinstance(value, bool):
            raise _Bad(f"expected int, {got}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)
        raise _Bad(f"expected int, {got}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        hint = "write a number like 3e-4, without quotes" if isinstance(value, str) else None
        raise _Bad(f"expected float, {got}", hint)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Bad(f"expected str, {got}", f"quote it: '{show(value)}'" if not isinstance(value, (list, dict)) else None)
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, list):
            raise _Bad(f"expected {type_name(tp)}, {got}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise _Bad(f"expected {type_name(tp)}, got {len(value)} elements: {show(value)}")
            return tuple(_element(v, a, i) for i, (v, a) in enumerate(zip(value, args)))
        elem = args[0] if args else Any
        items = [_element(v, elem, i) for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin in (dict, Mapping) or tp in (dict, Mapping):
        if not isinstance(value, dict):
            raise _Bad(f"expected a mapping, {got}")
        val_tp = args[1] if len(args) == 2 else Any
        return {k: _element(v, val_tp, k) for k, v in value.items()}
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise _Bad(f"expected {type_name(tp)}, {got}")


def _element(value: Any, tp: Any, index: Any) -> Any:
    try:
        return coerce(value, tp)
    except _Bad as bad:
        raise _Bad(f"element [{index}]: {bad.message}", bad.hint) from None
