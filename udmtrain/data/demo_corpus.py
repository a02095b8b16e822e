"""The offline ``demo`` corpus: English prose that ships with CPython itself.

Origin (documented in docs/data.md): every CPython installation carries

1. ``pydoc_data.topics.topics`` — the text of the Python Language Reference topics that ``help()``
   shows (about 0.47 MB; one document per topic), and
2. the docstrings of the pure-Python standard-library modules (about 1.6 MB on CPython 3.11; one
   document per module: the module docstring followed by its classes' and functions' docstrings),
   read with ``ast`` from the source files — nothing is imported or executed, and
3. ``this.s`` (the Zen of Python), decoded from its ROT13 form.

All of it is under the Python Software Foundation licence. The text depends on the Python version,
so the manifest records the Python version and a sha256 of the corpus (:func:`demo_identity`).
The order is deterministic (sorted paths). No download is involved.
"""

from __future__ import annotations

import ast
import codecs
import functools
import hashlib
import os
import sys
import sysconfig
from collections.abc import Iterator

# Test suites and tool packages hold little prose and a lot of code-like strings.
_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "lib2to3", "__pycache__", "ensurepip",
              "turtledemo", "dist-packages", "venv", "tkinter"}


def _module_document(path: str, name: str) -> str | None:
    """Module docstring + ``name: docstring`` paragraphs for its classes and functions."""
    try:
        with open(path, encoding="utf-8") as handle:
            tree = ast.parse(handle.read())
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return None
    parts: list[str] = []
    module_doc = ast.get_docstring(tree)
    if module_doc:
        parts.append(f"Module {name}\n\n{module_doc}")
    for node in ast.walk(tree):
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) > 40:  # one-liners like "Return x." add little prose
                parts.append(f"{name}.{node.name}\n\n{doc}")
    return "\n\n".join(parts) if parts else None


def _zen_of_python() -> str | None:
    """``this.s`` ROT13-decoded, read from ``this.py`` with ``ast`` (``import this`` would print it)."""
    path = os.path.join(sysconfig.get_paths()["stdlib"], "this.py")
    try:
        with open(path, encoding="utf-8") as handle:
            tree = ast.parse(handle.read())
    except (OSError, SyntaxError):
        return None
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "s":
            return codecs.decode(ast.literal_eval(node.value), "rot13")
    return None


def iter_demo_documents() -> Iterator[tuple[str, str]]:
    """Yield ``(key, text)`` documents of the demo corpus in a fixed order (cached per process)."""
    yield from _demo_documents()


@functools.lru_cache(maxsize=1)
def _demo_documents() -> tuple[tuple[str, str], ...]:
    return tuple(_read_demo_documents())


def _read_demo_documents() -> Iterator[tuple[str, str]]:
    from pydoc_data.topics import topics

    zen = _zen_of_python()
    if zen:
        yield "this", zen
    for topic in sorted(topics):
        yield f"topic/{topic}", topics[topic]
    stdlib = sysconfig.get_paths()["stdlib"]
    files: list[str] = []
    for root, dirs, names in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
        files.extend(os.path.join(root, n) for n in names if n.endswith(".py"))
    for path in sorted(files):
        rel = os.path.relpath(path, stdlib)
        name = rel[:-3].replace(os.sep, ".").removesuffix(".__init__")
        text = _module_document(path, name)
        if text:
            yield f"module/{name}", text


def demo_identity() -> dict[str, str]:
    """Where the demo corpus came from: the Python version and a sha256 over all documents."""
    digest = hashlib.sha256()
    for key, text in iter_demo_documents():
        digest.update(key.encode() + b"\0" + text.encode("utf-8") + b"\0")
    return {"python": sys.version.split()[0], "stdlib": sysconfig.get_paths()["stdlib"],
            "sha256": digest.hexdigest()}
