"""Document sources: local files, Hugging Face datasets (streamed), and the offline demo corpus.

Every source yields the *documents of one split* as strings, in a deterministic order, so that a
re-run (or a resumed run) sees the same stream. When a source has no validation split, every
``round(1 / valid_fraction)``-th document (positions ``k-1, 2k-1, ...``) is held out for validation;
the rest is training data. Empty documents are dropped and undecodable bytes are replaced by U+FFFD;
both are counted in :class:`SourceStats` (and end up in the manifest).
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from udmtrain.data.errors import DataError

TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet", ".txt.gz", ".jsonl.gz")

# Known hub datasets: hub name, config, validation split (None: last `valid_last` train docs).
HF_DATASETS: dict[str, dict[str, Any]] = {
    # OpenWebText has one split; the MDLM/UDLM protocol holds out its last 100,000 documents.
    "openwebtext": {"path": "Skylion007/openwebtext", "config": None, "valid_split": None,
                    "valid_last": 100_000, "num_train_docs": 8_013_769},
    "wikitext-103": {"path": "Salesforce/wikitext", "config": "wikitext-103-raw-v1",
                     "valid_split": "validation", "articles": True},
    "lm1b": {"path": "dvruette/lm1b", "config": None, "valid_split": "test"},
}


@dataclass
class SourceStats:
    """Counts kept while reading a split (written to the manifest)."""

    documents: int = 0
    empty_documents: int = 0
    documents_with_invalid_utf8: int = 0
    files: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["num_files"] = len(out.pop("files"))
        return out


@dataclass(kw_only=True)
class SourceSpec:
    """What ``--source`` and friends selected."""

    kind: str
    """``demo``, ``files`` or ``hf``."""
    inputs: list[str] = field(default_factory=list)
    """Paths, directories or globs (``files``)."""
    hf_name: str | None = None
    """Hub dataset name (``hf``): a key of ``HF_DATASETS`` or any hub path."""
    hf_config: str | None = None
    """Hub dataset config for names outside ``HF_DATASETS``."""
    text_field: str = "text"
    """JSONL/parquet/hub column holding the text."""
    txt_unit: str = "file"
    """``file``: one document per .txt file; ``paragraph``: split .txt files at blank lines."""
    valid_fraction: float = 0.02
    """Share of documents held out for validation when the source has no validation split."""

    def describe(self) -> dict[str, Any]:
        """The manifest's ``source`` record."""
        out: dict[str, Any] = {"kind": self.kind}
        if self.kind == "files":
            out.update(inputs=list(self.inputs), text_field=self.text_field, txt_unit=self.txt_unit)
        if self.kind == "hf":
            out.update(hf_name=self.hf_name, hf_config=self.hf_config, text_field=self.text_field)
        if self.kind == "demo":
            from udmtrain.data.demo_corpus import demo_identity

            out["demo"] = demo_identity()
        out["valid_fraction"] = self.valid_fraction
        return out


def expand_inputs(inputs: list[str]) -> list[str]:
    """Files named by ``inputs`` (files, directories searched recursively, globs), sorted, unique."""
    files: list[str] = []
    for item in inputs:
        if os.path.isdir(item):
            matches = [p for p in glob.glob(os.path.join(item, "**", "*"), recursive=True)
                       if p.endswith(TEXT_SUFFIXES) and os.path.isfile(p)]
        else:
            matches = [p for p in glob.glob(item, recursive=True) if os.path.isfile(p)]
        if not matches:
            raise DataError(f"--input {item!r} matches no file (supported: {', '.join(TEXT_SUFFIXES)}, "
                            "directories and globs)")
        files.extend(sorted(matches))
    unknown = [p for p in files if not p.endswith(TEXT_SUFFIXES)]
    if unknown:
        raise DataError(f"unsupported input file {unknown[0]!r}; supported suffixes: {', '.join(TEXT_SUFFIXES)}")
    return sorted(dict.fromkeys(os.path.abspath(p) for p in files))


def _decode(raw: bytes, stats: SourceStats) -> str:
    """UTF-8 text of ``raw``; invalid bytes become U+FFFD and the document is counted."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        stats.documents_with_invalid_utf8 += 1
        return raw.decode("utf-8", errors="replace")


def _open_bytes(path: str) -> io.BufferedIOBase:
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _iter_file(path: str, spec: SourceSpec, stats: SourceStats) -> Iterator[str]:
    """Raw documents of one file (before the empty check)."""
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"{path}: reading .parquet needs pyarrow (pip install pyarrow)") from None
        table = pq.ParquetFile(path)
        if spec.text_field not in table.schema_arrow.names:
            raise DataError(f"{path}: no column {spec.text_field!r} (columns: {table.schema_arrow.names}); "
                            "pass --text-field")
        for batch in table.iter_batches(columns=[spec.text_field]):
            yield from (t or "" for t in batch.column(0).to_pylist())
        return
    with _open_bytes(path) as handle:
        if ".jsonl" in path:
            for line_no, raw in enumerate(handle, start=1):
                if not raw.strip():
                    continue
                try:
                    record = json.loads(_decode(raw, stats))
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}:{line_no}: invalid JSON ({err.msg}); fix or remove the line") from None
                if not isinstance(record, dict) or spec.text_field not in record:
                    raise DataError(f"{path}:{line_no}: no field {spec.text_field!r} in this record; "
                                    "pass --text-field NAME")
                yield str(record[spec.text_field] or "")
            return
        text = _decode(handle.read(), stats)
    if spec.txt_unit == "paragraph":
        yield from re.split(r"\n\s*\n", text)
    else:
        yield text


def _iter_hf(spec: SourceSpec, split: str) -> Iterator[str]:
    """Stream a hub dataset's split (never materialised in memory)."""
    try:
        import datasets
    except ImportError:
        raise DataError("--source hf needs the 'datasets' package and network access: pip install -e '.[hf]' "
                        "(the project's Hugging Face extra: datasets + pyarrow)") from None
    known = HF_DATASETS.get(spec.hf_name or "", {})
    path, config = known.get("path", spec.hf_name), known.get("config", spec.hf_config)
    try:
        if known and known.get("valid_split") is None:  # openwebtext: last N train docs are valid
            stream = datasets.load_dataset(path, config, split="train", streaming=True)
            num_train = known["num_train_docs"] - known["valid_last"]
            stream = stream.take(num_train) if split == "train" else stream.skip(num_train)
        else:
            hub_split = "train" if split == "train" else known.get("valid_split", "validation")
            stream = datasets.load_dataset(path, config, split=hub_split, streaming=True)
    except Exception as err:
        raise DataError(f"cannot stream hub dataset {path!r} (config {config!r}, split {split!r}): "
                        f"{type(err).__name__}: {err}") from None
    if known.get("articles"):  # wikitext rows are lines; " = Title = " starts an article
        lines: list[str] = []
        for row in stream:
            line = row[spec.text_field]
            if re.match(r"^ = [^=].* = \n?$", line) and lines:
                yield "".join(lines)
                lines = []
            lines.append(line)
        if lines:
            yield "".join(lines)
        return
    for row in stream:
        yield row[spec.text_field]


def has_validation_split(spec: SourceSpec) -> bool:
    """Whether the source brings its own validation split (else a held-out share is used)."""
    return spec.kind == "hf" and (spec.hf_name in HF_DATASETS)


def _raw_documents(spec: SourceSpec, split: str, stats: SourceStats) -> Iterator[str]:
    if spec.kind == "demo":
        from udmtrain.data.demo_corpus import iter_demo_documents

        yield from (text for _, text in iter_demo_documents())
    elif spec.kind == "files":
        files = expand_inputs(spec.inputs)
        stats.files = files
        for path in files:
            yield from _iter_file(path, spec, stats)
    elif spec.kind == "hf":
        if not spec.hf_name:
            raise DataError("--source hf needs --hf-name (openwebtext, wikitext-103, lm1b or a hub path)")
        yield from _iter_hf(spec, split)
    else:
        raise DataError(f"unknown --source {spec.kind!r}; use demo, files or hf")


def iter_documents(spec: SourceSpec, split: str, stats: SourceStats | None = None) -> Iterator[str]:
    """The non-empty documents of ``split`` (``train`` or ``valid``) in a deterministic order."""
    if split not in ("train", "valid"):
        raise DataError(f"split must be train or valid, got {split!r}")
    stats = stats if stats is not None else SourceStats()
    own_split = has_validation_split(spec)
    every = max(2, round(1.0 / spec.valid_fraction)) if spec.valid_fraction > 0 else 0
    position = -1
    for text in _raw_documents(spec, split, stats):
        if not text or not text.strip():
            stats.empty_documents += 1
            continue
        position += 1
        if not own_split:
            held_out = every > 0 and position % every == every - 1
            if held_out != (split == "valid"):
                continue
        stats.documents += 1
        yield text
