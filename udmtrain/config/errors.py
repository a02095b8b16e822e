"""Structured recipe errors: every problem is a ``ConfigIssue``; all of them raise as one ``ConfigError``.

The report format (docs/design.md §6)::

    udmtrain: recipe recipes/mdlm.yaml has 2 problems

      recipes/mdlm.yaml:24:3  optim.lrr
          unknown key in 'optim'; did you mean 'lr'?
          valid keys: name, lr, betas, eps, weight_decay, fused

      command line arg 2  engine.micro_batch_size=16x
          expected int, got '16x' (str)

    Print the resolved recipe with --dry-run; every key is documented in docs/recipes.md.

Origin first, then the dotted path (with ``=value`` when the value is part of the story), then a
one-line problem and at most one hint line. Tests assert on the fields, users read the prose.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

DOCS_PAGE = "docs/recipes.md"
FOOTER = f"Print the resolved recipe with --dry-run; every key is documented in {DOCS_PAGE}."
EXIT_CODE = 2

F = TypeVar("F", bound=Callable[..., Any])


@dataclasses.dataclass(frozen=True)
class ConfigIssue:
    """One problem in a recipe."""

    path: str
    """Dotted path of the offending key (``optim.lr``), or ``""`` for a whole-file problem."""
    origin: str
    """Where the value came from: ``file:line:col``, ``command line arg N`` or a file name."""
    message: str
    """The problem, one line."""
    hint: str | None = None
    """At most one line saying how to fix it (valid keys, registered names, nearest valid value)."""
    value: str | None = None
    """The offending value as typed, shown as ``path=value`` when set."""

    def format(self) -> str:
        """The issue as an indented block of 2-3 lines (no trailing newline)."""
        head = self.path if self.value is None else f"{self.path}={self.value}"
        lines = [f"  {self.origin}  {head}".rstrip(), f"      {self.message}"]
        if self.hint:
            lines.append(f"      {self.hint}")
        return "\n".join(lines)


class ConfigError(Exception):
    """All problems found in one recipe (never raised with an empty list)."""

    def __init__(self, issues: Sequence[ConfigIssue], recipe: str | None = None):
        self.issues: list[ConfigIssue] = list(issues)
        self.recipe = recipe
        super().__init__(self.format())

    def format(self) -> str:
        """The full user-facing report: header, one block per issue, footer."""
        n = len(self.issues)
        what = f"recipe {self.recipe}" if self.recipe else "the command line"
        header = f"udmtrain: {what} has {n} problem{'s' if n != 1 else ''}"
        blocks = "\n\n".join(issue.format() for issue in self.issues)
        return f"{header}\n\n{blocks}\n\n{FOOTER}"

    def __str__(self) -> str:  # pytest.raises(match=...) matches on this
        return self.format()


def report_and_exit(err: ConfigError, stream=None) -> None:
    """Print ``err`` on global rank 0 (``RANK`` env, default 0) to stderr and exit with code 2.

    Other ranks exit with the same code silently, so a multi-process launch prints one report.
    """
    if int(os.environ.get("RANK", "0") or 0) == 0:
        print(err.format(), file=stream or sys.stderr, flush=True)
    raise SystemExit(EXIT_CODE)


def exit_on_config_error(fn: F) -> F:
    """Decorator for entry points: a ``ConfigError`` becomes the report + exit code 2, no traceback.

    With ``UDMTRAIN_DEBUG=1`` the exception propagates (traceback kept) for debugging udmtrain itself.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ConfigError as err:
            if os.environ.get("UDMTRAIN_DEBUG") == "1":
                raise
            report_and_exit(err)

    return wrapper  # type: ignore[return-value]
