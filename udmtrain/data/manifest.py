"""``manifest.json``: what a shard directory holds, and the pre-training check against the recipe.

Layout (``format_version`` 1)::

    {"format_version": 1, "command": "python tools/prepare_data.py ...",
     "source": {...}, "tokenizer": {"name", "path", "sha256", "vocab_size", "bos_id", "eos_id", "pad_id"},
     "vocab_size": V, "seq_len": L, "packing": "wrap" | "pad", "samples_per_shard": S,
     "splits": {"train": {"num_shards", "num_samples", "num_tokens", "num_documents",
                          "shards": [{"name", "samples", "tokens", "bytes", "sha256"}, ...],
                          "stats": {...}},
                "valid": {...}},
     "tokens_per_second": ...}

``num_tokens`` counts non-padding positions (BOS/EOS included). ``bytes`` and ``sha256`` of each
shard were added later; manifests without them still load (the size check is then skipped, with a
warning). Before training only ``bytes`` is compared (:func:`verify_shard_set`, cheap); the full
``sha256`` check reads every shard and runs on request (:func:`verify_shard_hashes`,
``tools/prepare_data.py --verify --out DIR``). Shards of prompt-conditioned samples
(``prepare_prompted``) add ``"prompt": true``, ``"packing": "none"`` and per split
``num_prompt_tokens``; their samples carry a ``prompt.npy`` mask.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any

from udmtrain.data.errors import DataError
from udmtrain.data.shards import is_local, local_path

log = logging.getLogger("udmtrain.data")
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class Manifest:
    """A parsed ``manifest.json`` (``raw`` keeps every field)."""

    path: str
    raw: dict[str, Any]

    @property
    def vocab_size(self) -> int:
        return int(self.raw["vocab_size"])

    @property
    def seq_len(self) -> int:
        return int(self.raw["seq_len"])

    @property
    def tokenizer(self) -> dict[str, Any]:
        return dict(self.raw["tokenizer"])

    @property
    def pad_id(self) -> int:
        return int(self.raw["tokenizer"]["pad_id"])

    def split(self, name: str) -> dict[str, Any]:
        """The record of split ``name``; :class:`DataError` if the manifest has none."""
        try:
            return self.raw["splits"][name]
        except KeyError:
            raise DataError(f"{self.path}: no {name!r} split (has {sorted(self.raw.get('splits', {}))})") from None

    def shard_samples(self, split: str) -> dict[str, int]:
        """``{shard file name: number of samples}`` of ``split``."""
        return {s["name"]: int(s["samples"]) for s in self.split(split)["shards"]}


def verify_shard_set(manifest: Manifest, spec: Any, urls: list[str], split: str,
                     on_corrupt: str = "fail") -> dict[str, int]:
    """Check the shard URLs a recipe selects against the manifest; returns ``{url: samples}``.

    The manifest, not the file system, says what the data set is: every selected shard must be
    listed (an extra file is refused); when the spec selects "whatever is there" (a directory or a
    glob), every listed shard must be present; and a local shard whose size differs from the
    recorded ``bytes`` (truncated, replaced) is refused, or with ``on_corrupt="skip"`` only reported
    (the loader then skips and counts what it cannot read). Raises :class:`DataError` naming the shard.
    """
    listed = {s["name"]: s for s in manifest.split(split)["shards"]}
    hint = f"rebuild the shards with: {manifest.raw.get('command') or 'tools/prepare_data.py'}"
    names = [os.path.basename(local_path(u)) for u in urls]
    extra = [u for u, n in zip(urls, names) if n not in listed]
    if extra:
        raise DataError(f"shard {extra[0]} is not listed in {manifest.path} ({len(extra)} such); it is not part "
                        f"of this data set: remove it, or {hint}")
    patterns = spec if isinstance(spec, (list, tuple)) else [spec]
    whole = all(is_local(str(p)) and (os.path.isdir(local_path(str(p))) or any(c in str(p) for c in "*?["))
                for p in patterns)
    missing = sorted(set(listed) - set(names)) if whole else []
    if missing:
        where = os.path.dirname(local_path(urls[0])) if urls else "."
        raise DataError(f"shard {os.path.join(where, missing[0])} is listed in {manifest.path} but missing "
                        f"({len(missing)} of {len(listed)} {split} shards); restore it, or {hint}")
    unsized = 0
    for url, name in zip(urls, names):
        recorded = listed[name].get("bytes")
        if recorded is None:
            unsized += 1
        elif is_local(url) and os.path.getsize(local_path(url)) != int(recorded):
            problem = (f"shard {url} has {os.path.getsize(local_path(url))} bytes but {manifest.path} records "
                       f"{recorded}: it was truncated or replaced")
            if on_corrupt != "skip":  # a re-run keeps finished shards: only --overwrite rebuilds this one
                raise DataError(f"{problem}; {hint} --overwrite (or set data.on_corrupt: skip to read what is left)")
            log.warning("%s; data.on_corrupt=skip: reading what is left", problem)
    if unsized:
        log.warning("%s records no shard sizes (written by an older prepare_data): shard truncation is detected "
                    "only when a shard is exhausted; re-run tools/prepare_data.py --overwrite to add them",
                    manifest.path)
    return {url: int(listed[name]["samples"]) for url, name in zip(urls, names)}


def verify_shard_hashes(path: str, splits: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Check every shard a manifest lists against its recorded ``bytes`` and ``sha256`` (reads them all).

    ``path``: a data directory or its ``manifest.json``; ``splits``: those to check (default: all).
    Returns ``{"manifest", "splits": {split: shards checked}, "bytes"}``; raises :class:`DataError`
    naming the first shard that is missing, has another size or hash, or has no recorded hash.
    Shards are looked up beside the manifest (copy remote shards there first).
    """
    from udmtrain.data.tokenizers import sha256_of_files

    manifest = load_manifest(path)
    where = os.path.dirname(manifest.path)
    hint = f"rebuild the shards with: {manifest.raw.get('command') or 'tools/prepare_data.py'} --overwrite"
    checked, total = {}, 0
    for split in splits or tuple(manifest.raw["splits"]):
        shards = manifest.split(split)["shards"]
        for shard in shards:
            file = os.path.join(where, shard["name"])
            if "sha256" not in shard:
                raise DataError(f"{manifest.path} records no sha256 for {shard['name']} (written by an older "
                                "prepare_data), so it cannot be verified; re-run tools/prepare_data.py --overwrite")
            if not os.path.isfile(file):
                raise DataError(f"shard {file} is listed in {manifest.path} but missing; restore it, or {hint}")
            size, digest = os.path.getsize(file), sha256_of_files([file])
            if size != int(shard["bytes"]) or digest != shard["sha256"]:
                raise DataError(f"shard {file} has sha256 {digest[:16]}... ({size} bytes) but {manifest.path} "
                                f"records {shard['sha256'][:16]}... ({shard['bytes']} bytes): its contents changed "
                                f"after prepare_data wrote it; restore it, or {hint}")
            total += size
        checked[split] = len(shards)
    return {"manifest": manifest.path, "splits": checked, "bytes": total}


def write_manifest(directory: str, record: dict[str, Any]) -> str:
    """Write ``record`` as ``directory/manifest.json`` atomically (temp file + rename)."""
    path = os.path.join(directory, MANIFEST_NAME)
    with open(path + ".tmp", "w", encoding="utf-8") as handle:
        json.dump(record, handle, indent=1, sort_keys=True)
    os.replace(path + ".tmp", path)
    return path


def load_manifest(path: str) -> Manifest:
    """Read a manifest file (or ``DIR/manifest.json``); clear :class:`DataError` when absent/invalid."""
    if os.path.isdir(path):
        path = os.path.join(path, MANIFEST_NAME)
    if not os.path.isfile(path):
        raise DataError(f"no manifest at {path}; shards must come from tools/prepare_data.py, which writes it")
    try:
        with open(path, encoding="utf-8") as handle:
            raw = json.load(handle)
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: not a readable JSON manifest ({err}); re-run tools/prepare_data.py") from None
    missing = [k for k in ("vocab_size", "seq_len", "tokenizer", "splits") if k not in raw]
    if missing:
        raise DataError(f"{path}: manifest lacks {missing}; re-run tools/prepare_data.py")
    if raw.get("format_version", 0) > FORMAT_VERSION:
        raise DataError(f"{path}: manifest format {raw['format_version']} is newer than this udmtrain "
                        f"({FORMAT_VERSION}); upgrade udmtrain")
    return Manifest(path=path, raw=raw)


def manifest_path_for(spec: Any, explicit: str | None = None) -> str:
    """Where the manifest of a shard spec lives: ``explicit`` or the directory of its first entry.

    Remote shards (``pipe:``, ``http:``) need ``data.manifest`` (or ``UDMTRAIN_MANIFEST``) set to a
    local copy, because the manifest is read before any worker starts.
    """
    if explicit:
        return explicit
    first = (list(spec) if isinstance(spec, (list, tuple)) else [spec])[0]
    first = str(first)
    if not is_local(first):
        env = os.environ.get("UDMTRAIN_MANIFEST")
        if env:
            return env
        raise DataError(f"shards {first!r} are remote; set data.manifest (or UDMTRAIN_MANIFEST) to a local "
                        "copy of their manifest.json")
    path = local_path(first)
    return path if os.path.isdir(path) else os.path.dirname(path) or "."


def _tokenizer_name(expected: Any) -> tuple[str, str | None]:
    """(registry name, path) of a recipe tokenizer value: ``gpt2``, a ``.model`` path, a GPT-2 dir,
    or a component with ``.name``/``.cfg.path``."""
    if hasattr(expected, "name") and hasattr(expected, "cfg"):
        return expected.name, getattr(expected.cfg, "path", None)
    path = str(expected)
    if path == "sudoku":
        return "sudoku", None
    return ("sentencepiece" if path.endswith(".model") else "gpt2"), path


def _tokenizer_hash(expected: Any) -> str | None:
    """sha256 of the recipe tokenizer's files (None for a GPT-2 not resolvable offline)."""
    from udmtrain.data.tokenizers import load_tokenizer

    name, path = _tokenizer_name(expected)
    try:
        return load_tokenizer(expected).identity()["sha256"]
    except DataError as err:
        if name == "sentencepiece":  # missing or damaged: the loader's message says which, and the fix
            key = "tokenizer.path" if hasattr(expected, "cfg") else "data.tokenizer"
            raise DataError(f"{key}={path}: {err}", rebuild_fixes=err.rebuild_fixes) from None
        return None  # gpt2 not resolvable here (offline): compare the name only


def _tokenizer_vocab_size(expected: Any) -> int | None:
    """V of the recipe's tokenizer, or None when it cannot be loaded here (e.g. GPT-2 offline)."""
    from udmtrain.data.tokenizers import load_tokenizer

    try:
        return int(load_tokenizer(expected).vocab_size)
    except (DataError, OSError):
        return None


def check_manifest(data_cfg: Any, expected_vocab_size: int | None = None,
                   expected_tokenizer: Any = None) -> Manifest:
    """Check the recipe's ``data:`` section against the shards' manifest before training starts.

    Compares ``seq_len``, the vocabulary size V (``expected_vocab_size``, the tokenizer's V) and the
    tokenizer (name and sha256 of its files; ``expected_tokenizer`` defaults to
    ``data_cfg.tokenizer``), and checks that every local shard exists. Returns the train manifest;
    raises :class:`DataError` naming the manifest, the field and the fix.
    """
    explicit = getattr(data_cfg, "manifest", None)
    manifest = load_manifest(manifest_path_for(data_cfg.train_shards, explicit))
    checked = [manifest]
    valid_spec = getattr(data_cfg, "valid_shards", None)
    if valid_spec:
        valid_path = manifest_path_for(valid_spec, explicit)
        other = load_manifest(valid_path)
        if other.path != manifest.path:
            checked.append(other)
    if expected_tokenizer is None:
        expected_tokenizer = getattr(data_cfg, "tokenizer", None)
    if expected_vocab_size is None and expected_tokenizer is not None:
        expected_vocab_size = _tokenizer_vocab_size(expected_tokenizer)
    want_name = _tokenizer_name(expected_tokenizer)[0] if expected_tokenizer else None
    want_hash: str | None = None
    for m in checked:
        fix = f"re-run tools/prepare_data.py with the recipe's settings, or change the recipe (manifest {m.path})"
        if m.seq_len != int(data_cfg.seq_len):
            raise DataError(f"data.seq_len={data_cfg.seq_len} but the shards were built with seq_len={m.seq_len} "
                            f"({m.path}); {fix}")
        if expected_vocab_size is not None and m.vocab_size != int(expected_vocab_size):
            raise DataError(f"vocabulary size {expected_vocab_size} expected (the tokenizer's) but the shards' "
                            f"manifest says V={m.vocab_size} ({m.path}); {fix}")
        recorded = m.tokenizer
        if want_name is not None and recorded.get("name") != want_name:
            raise DataError(f"data.tokenizer is {want_name!r} but the shards were tokenized with "
                            f"{recorded.get('name')!r} ({recorded.get('path')}) per {m.path}; {fix}")
        if want_name is not None and want_hash is None:
            want_hash = _tokenizer_hash(expected_tokenizer) or ""
        if want_hash and recorded.get("sha256") != want_hash:
            raise DataError(f"data.tokenizer files differ from the ones the shards were built with "
                            f"(sha256 {want_hash[:12]} vs {str(recorded.get('sha256'))[:12]} in {m.path}); {fix}")
    from udmtrain.data.shards import resolve_shards

    on_corrupt = str(getattr(data_cfg, "on_corrupt", "fail"))
    verify_shard_set(manifest, data_cfg.train_shards, resolve_shards(data_cfg.train_shards, "train"), "train",
                     on_corrupt)
    if valid_spec:
        verify_shard_set(checked[-1], valid_spec, resolve_shards(valid_spec, "valid"), "valid", on_corrupt)
    return manifest
