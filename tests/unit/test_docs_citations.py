"""The repository explains itself: citations point at documents inside it, and at headings that exist.

Code, docs and tools cite ``docs/theory.md §5.2`` (a numbered section of the math), ``docs/theory.md
Appendix A``, ``docs/design.md C4`` (a convention) or ``docs/design.md §5`` (a section). A citation is
a heading id: the first word of a Markdown heading (``## 5.2 Temperature`` -> ``5.2``,
``### C4 — Select ...`` -> ``C4``, ``## Appendix A ...`` -> ``Appendix A``).

Two checks:
* every such citation (and every bare ``§X`` inside docs/theory.md and docs/design.md, which refers to
  the document itself) names a heading of the cited document;
* nothing cites the developer documents that live outside the repository (their names, or a path
  into the directory that holds them).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
THIS = Path(__file__).resolve()
SCANNED = ("udmtrain", "tools", "launch", "recipes", "docs", "tests", "README.md")
SKIP_DIRS = {"__pycache__", ".pytest_cache"}
SKIP_SUFFIXES = {".pyc", ".png", ".pt", ".tar", ".npy", ".so"}

DOCS = {"theory": ROOT / "docs" / "theory.md", "design": ROOT / "docs" / "design.md"}

# Names of documents outside the repository, or a path into their directory.
OUTSIDE = re.compile(r"\bSPEC\b|\bDESIGN\b|\.\./shared|shared/SPEC")

_NUM = r"\d+(?:\.\d+)*"
_ID = rf"(?:§\s*{_NUM}|C\d+|Appendix [A-Z])"
# "docs/theory.md §3.4/3.5", "docs/theory.md §1.1-1.3", "docs/design.md C3/C4", "docs/theory.md §2, §5.1"
CITATION = re.compile(
    rf"docs/(theory|design)\.md`?\s*(?P<ids>{_ID}(?:\s*[/\-–]\s*(?:§\s*)?(?:{_NUM}|C\d+)"
    rf"|\s*(?:,|and|or)\s*{_ID})*)(?:\s+\"(?P<label>[^\"\n]+)\")?")
ONE_ID = re.compile(rf"Appendix [A-Z]|C\d+|{_NUM}")
BARE = re.compile(rf"§\s*({_NUM})")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*$", re.MULTILINE)


def heading_ids(text: str) -> set[str]:
    """Ids of the Markdown headings of ``text``: the first word (``Appendix X`` as two), trailing ``.:`` stripped."""
    ids = set()
    for title in HEADING.findall(text):
        words = title.split()
        if words[0] == "Appendix" and len(words) > 1:
            ids.add(f"Appendix {words[1].rstrip('.:')}")
        else:
            ids.add(words[0].rstrip(".:"))
    return ids


def citations(text: str) -> tuple[list[tuple[str, str, str | None]], list[tuple[int, int]]]:
    """``([(doc, heading id, quoted label or None), ...], spans)`` of the prefixed citations in ``text``."""
    found, spans = [], []
    for m in CITATION.finditer(text):
        for ref in ONE_ID.findall(m.group("ids")):
            found.append((m.group(1), ref, m.group("label")))
        spans.append(m.span())
    return found, spans


def bare_refs(text: str, spans: list[tuple[int, int]]) -> list[str]:
    """``§X`` references outside the prefixed citations (a document referring to itself)."""
    inside = lambda pos: any(a <= pos < b for a, b in spans)  # noqa: E731
    return [m.group(1) for m in BARE.finditer(text) if not inside(m.start())]


def scanned_files() -> list[Path]:
    """Every text file under the scanned roots, except this test (which must spell the forbidden names)."""
    out = []
    for name in SCANNED:
        root = ROOT / name
        paths = [root] if root.is_file() else sorted(root.rglob("*")) if root.is_dir() else []
        for path in paths:
            if (path.is_file() and path.resolve() != THIS and path.suffix not in SKIP_SUFFIXES
                    and not SKIP_DIRS.intersection(path.parts)):
                out.append(path)
    return out


def read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


# ------------------------------------------------------------------------------- the parser itself
def test_parser_finds_every_citation_form():
    text = ('see docs/theory.md §3.4/3.5 and docs/theory.md §1.1-1.3, `docs/design.md` C3/C4; '
            'docs/theory.md §0 "Precision"; docs/theory.md Appendix A; docs/design.md §5, '
            'docs/theory.md §5.2, 12 positions; docs/theory.md §2, §5.1')
    found, _ = citations(text)
    assert [(d, r) for d, r, _ in found] == [
        ("theory", "3.4"), ("theory", "3.5"), ("theory", "1.1"), ("theory", "1.3"), ("design", "C3"),
        ("design", "C4"), ("theory", "0"), ("theory", "Appendix A"), ("design", "5"), ("theory", "5.2"),
        ("theory", "2"), ("theory", "5.1")]
    assert found[6][2] == "Precision"
    assert heading_ids("# T\n## 5.2 Temperature\n### C4 — Select\n## Appendix A Knobs\n## 6. Errors\n") == {
        "T", "5.2", "C4", "Appendix A", "6"}


def test_a_citation_of_a_missing_heading_is_reported():
    """The checker catches a citation of a heading that does not exist (negative control)."""
    bad = "cites docs/theory.md §5.9 and docs/design.md C99"
    assert missing_citations({"x.py": bad}, {"theory": {"5.2"}, "design": {"C4"}}, {"theory": ""}) == [
        "x.py: docs/theory.md §5.9", "x.py: docs/design.md C99"]


def missing_citations(texts: dict[str, str], ids: dict[str, set[str]], bodies: dict[str, str]) -> list[str]:
    """Citations in ``texts`` (name -> text) whose heading id is not in ``ids[doc]``, or whose quoted
    label does not occur in the cited document ``bodies[doc]``."""
    bad = []
    for name, text in texts.items():
        found, spans = citations(text)
        for doc, ref, label in found:
            shown = ref if ref[0] in "CA" else f"§{ref}"
            if ref not in ids[doc]:
                bad.append(f"{name}: docs/{doc}.md {shown}")
            elif label is not None and label not in bodies.get(doc, ""):
                bad.append(f"{name}: docs/{doc}.md {shown} \"{label}\" (label not in the document)")
        for doc, path in DOCS.items():  # a doc's bare § refers to itself
            if name == str(path.relative_to(ROOT)):
                bad += [f"{name}: §{ref} (own section)" for ref in bare_refs(text, spans) if ref not in ids[doc]]
    return bad


# ------------------------------------------------------------------------------- the repository
def test_both_documents_exist_with_their_numbered_headings():
    theory = heading_ids(DOCS["theory"].read_text(encoding="utf-8"))
    design = heading_ids(DOCS["design"].read_text(encoding="utf-8"))
    expected_theory = {"0", "1", "1.1", "1.2", "1.3", "2", "3", "4", "5", "6", "7", "10", "Appendix A"}
    expected_theory |= {f"3.{i}" for i in range(1, 7)} | {f"5.{i}" for i in range(1, 8)}
    expected_theory |= {f"10.{i}" for i in range(1, 19)}
    assert expected_theory <= theory, sorted(expected_theory - theory)
    expected_design = {f"C{i}" for i in range(1, 21)} | {"0", "3", "4", "5", "6", "7", "8"}
    assert expected_design <= design, sorted(expected_design - design)


def test_every_citation_names_an_existing_heading():
    bodies = {doc: path.read_text(encoding="utf-8") for doc, path in DOCS.items()}
    ids = {doc: heading_ids(text) for doc, text in bodies.items()}
    texts = {}
    for path in scanned_files():
        text = read_text(path)
        if text is not None:
            texts[str(path.relative_to(ROOT))] = text
    bad = missing_citations(texts, ids, bodies)
    assert not bad, "citations of headings that do not exist (fix the citation or the heading):\n" + "\n".join(bad)


def test_nothing_cites_documents_outside_the_repository():
    hits = []
    for path in scanned_files():
        text = read_text(path)
        if text is None:
            continue
        for lineno, line in enumerate(text.splitlines(), 1):
            if OUTSIDE.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{lineno}: {line.strip()[:100]}")
    assert not hits, ("cite docs/theory.md §X or docs/design.md CN instead of documents outside the "
                      f"repository ({len(hits)} places):\n" + "\n".join(hits[:60]))
