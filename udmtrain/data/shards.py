"""Shard lists, deterministic shard assignment, and sample encoding/decoding.

A shard location in the recipe (``data.train_shards`` / ``data.valid_shards``) is one of

* a directory holding ``{split}-{index:06d}.tar`` files (the ``prepare_data`` output),
* a brace pattern (``/data/owt/train-{000000..000767}.tar``, also for ``pipe:`` and ``http(s):``),
* a glob of local files (``/data/owt/train-*.tar``), or a list of those.

Assignment (what makes the loader deterministic and its cursor exact): in epoch ``e`` the shard list
is permuted with a generator seeded by ``(seed, e)`` (the same on every rank); rank ``r`` of ``R``
takes positions ``r, r+R, ...`` and its worker ``w`` of ``W`` takes every ``W``-th of those. Each
shard therefore goes to exactly one (rank, worker) per epoch.
"""

from __future__ import annotations

import glob
import io
import os
import re
from typing import Any

import numpy as np
from braceexpand import braceexpand

from udmtrain.data.errors import DataError

SHARD_RE = re.compile(r"^(train|valid)-(\d{6})\.tar$")


def shard_name(split: str, index: int) -> str:
    """``{split}-{index:06d}.tar``."""
    return f"{split}-{index:06d}.tar"


def is_local(url: str) -> bool:
    """Whether ``url`` is a plain local path (``file:`` included), so its existence can be checked."""
    return url.startswith("file:") or not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", url)


def local_path(url: str) -> str:
    return url[len("file:"):] if url.startswith("file:") else url


def _as_list(spec: Any) -> list[str]:
    if spec is None:
        return []
    if isinstance(spec, (list, tuple)):
        return [str(s) for s in spec]
    return [str(spec)]


PREPARE_SOURCES = {"owt": "--source hf --hf-name openwebtext", "openwebtext": "--source hf --hf-name openwebtext",
                   "demo": "--source demo"}
"""``--source`` guessed from the output directory's name; any other name gets ``--source files``."""


def prepare_command(pattern: str, tokenizer: str | None = None, seq_len: int | None = None) -> str:
    """``python tools/prepare_data.py ...`` that writes the shards behind ``pattern`` (a directory, a
    ``train-*.tar`` glob or a brace pattern) with ``tokenizer`` (its ``--tokenizer`` spelling) and
    ``seq_len``. A directory that already holds shards of other settings gets ``--overwrite`` (the tool
    refuses to mix them), with the alternative spelled out."""
    looks_like_dir = os.path.isdir(pattern) or not any(ch in pattern for ch in "{*?[") and not pattern.endswith(".tar")
    out = pattern if looks_like_dir else (os.path.dirname(pattern) or ".")
    source = PREPARE_SOURCES.get(os.path.basename(os.path.normpath(out)).lower(), "--source files --input CORPUS")
    command = (f"python tools/prepare_data.py {source} --tokenizer {tokenizer or 'TOKENIZER'} "
               f"--seq-len {seq_len or 'SEQ_LEN'} --out {out}")
    if os.path.isfile(os.path.join(out, "prepare_config.json")):
        command += (f" --overwrite  (this replaces the shards in {out}; or pick a new --out and point "
                    "data.train_shards/data.valid_shards at it)")
    return command


def prepare_hint(pattern: str, split: str, manifest_command: str | None = None) -> str:
    """The exact command that (re)builds the shards behind ``pattern``: the one its manifest recorded,
    else :func:`prepare_command` with placeholders for the settings only the user knows."""
    if manifest_command:
        return manifest_command
    return prepare_command(pattern)


def resolve_shards(spec: Any, split: str, check_exists: bool = True) -> list[str]:
    """Expand ``spec`` (directory, brace pattern, glob, or a list) into shard URLs, in order.

    Local shards must exist; a missing one raises :class:`DataError` naming the pattern and the
    ``prepare_data`` command that builds it. A shard selected twice (e.g. a directory and one of its
    files, or two spellings of one path) is refused: it would be read twice per epoch.
    """
    patterns = _as_list(spec)
    if not patterns:
        raise DataError(f"data.{split}_shards is empty; set it to the prepare_data output directory")
    urls: list[str] = []
    origins: list[str] = []  # the entry of ``spec`` that selected each URL
    for pattern in patterns:
        command = _manifest_command(pattern)
        if is_local(pattern) and os.path.isdir(local_path(pattern)):
            directory = local_path(pattern)
            found = sorted(n for n in os.listdir(directory) if SHARD_RE.match(n) and n.startswith(split + "-"))
            if not found:
                raise DataError(f"no {split}-*.tar shards in directory {pattern!r}; build them with: "
                                f"{prepare_hint(directory, split, command)}")
            urls.extend(os.path.join(directory, n) for n in found)
            origins.extend([pattern] * len(found))
            continue
        expanded = list(braceexpand(pattern))
        if is_local(pattern) and any(ch in pattern for ch in "*?["):
            expanded = sorted(p for e in expanded for p in glob.glob(local_path(e)))
            if not expanded:
                raise DataError(f"data.{split}_shards pattern {pattern!r} matches no file; build the shards "
                                f"with: {prepare_hint(pattern, split, command)}")
        if check_exists:
            missing = [u for u in expanded if is_local(u) and not os.path.isfile(local_path(u))]
            if missing:
                raise DataError(
                    f"{len(missing)} of {len(expanded)} shards of data.{split}_shards pattern {pattern!r} are "
                    f"missing (first: {missing[0]}); build them with: {prepare_hint(pattern, split, command)}")
        urls.extend(expanded)
        origins.extend([pattern] * len(expanded))
    _refuse_duplicates(urls, origins, split)
    return urls


def _refuse_duplicates(urls: list[str], origins: list[str], split: str) -> None:
    """:class:`DataError` naming the first shard that ``urls`` lists twice and the entries that selected
    it; local paths are compared resolved (``file:``, relative parts, symbolic links), remote URLs as written."""
    seen: dict[str, int] = {}
    for i, url in enumerate(urls):
        key = os.path.realpath(local_path(url)) if is_local(url) else url
        if key in seen:
            first = seen[key]
            by = (f"entry {origins[i]!r} names it twice" if origins[first] == origins[i]
                  else f"entries {origins[first]!r} and {origins[i]!r} both select it")
            note = (f" (a directory entry already selects all its {split}-*.tar shards)"
                    if any(is_local(o) and os.path.isdir(local_path(o)) for o in (origins[first], origins[i])) else "")
            raise DataError(f"data.{split}_shards selects shard {urls[first]} twice ({by}), so it would be read "
                            f"twice per epoch; remove the overlap{note}", rebuild_fixes=False)
        seen[key] = i


def _manifest_command(pattern: str) -> str | None:
    """The ``command`` recorded in the manifest next to a local pattern, if there is one."""
    if not is_local(pattern):
        return None
    path = local_path(pattern)
    directory = path if os.path.isdir(path) else os.path.dirname(path)
    manifest = os.path.join(directory or ".", "manifest.json")
    if os.path.isfile(manifest):
        import json

        try:
            with open(manifest, encoding="utf-8") as handle:
                return json.load(handle).get("command")
        except (OSError, ValueError):
            return None
    return None


def epoch_order(num_shards: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """Shard indices of ``epoch``: a permutation seeded by ``(seed, epoch)``, identical on all ranks."""
    if not shuffle:
        return list(range(num_shards))
    return [int(i) for i in np.random.default_rng([seed, epoch, 0x5EED]).permutation(num_shards)]


def assign(order: list[int], rank: int, world_size: int, worker: int, num_workers: int) -> list[int]:
    """The part of ``order`` that (rank, worker) reads: ``order[rank::R][worker::W]``."""
    return order[rank::world_size][worker::num_workers]


def encode_sample(input_ids: np.ndarray, doc_ids: np.ndarray, prompt: np.ndarray | None = None) -> dict[str, bytes]:
    """``{"input_ids.npy", "doc_ids.npy"}`` bytes of one packed sample (int32 arrays), plus
    ``"prompt.npy"`` (bool ``[seq_len]``, True = a clean conditioning position) when ``prompt`` is given."""
    out = {}
    fields = [("input_ids.npy", input_ids, np.int32), ("doc_ids.npy", doc_ids, np.int32)]
    if prompt is not None:
        fields.append(("prompt.npy", prompt, np.bool_))
    for name, arr, dtype in fields:
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(arr, dtype=dtype), allow_pickle=False)
        out[name] = buf.getvalue()
    return out


class CorruptSample(Exception):
    """A sample that cannot be decoded or has the wrong shape/dtype."""


def decode_sample(raw: dict[str, Any], seq_len: int, vocab_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(input_ids, doc_ids)`` int32 ``[seq_len]`` of a raw sample; :class:`CorruptSample` otherwise.

    With ``vocab_size`` every input id must lie in ``[0, vocab_size)`` (one min/max per sample), so
    an out-of-range id is reported with its sample key instead of an ``IndexError`` in the model.
    """
    arrays = []
    for name in ("input_ids.npy", "doc_ids.npy"):
        if name not in raw:
            raise CorruptSample(f"sample {raw.get('__key__')!r} has no {name} (fields: {sorted(raw)})")
        try:
            arr = np.load(io.BytesIO(raw[name]), allow_pickle=False)
        except Exception as err:
            raise CorruptSample(f"sample {raw.get('__key__')!r}: {name} is not a valid .npy ({err})") from None
        if arr.shape != (seq_len,) or arr.dtype.kind not in "iu":
            raise CorruptSample(f"sample {raw.get('__key__')!r}: {name} has shape {arr.shape} dtype {arr.dtype}, "
                                f"expected int [{seq_len}]")
        arrays.append(arr.astype(np.int32, copy=False))
    ids = arrays[0]
    if vocab_size is not None and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        bad = int(ids.max()) if int(ids.max()) >= vocab_size else int(ids.min())
        raise CorruptSample(f"sample {raw.get('__key__')!r} holds token id {bad} outside the vocabulary "
                            f"[0, {vocab_size}) of the manifest's tokenizer")
    return ids, arrays[1]


def decode_prompt(raw: dict[str, Any], seq_len: int) -> np.ndarray:
    """The bool ``[seq_len]`` prompt mask of a raw sample (all False when it has no ``prompt.npy``);
    :class:`CorruptSample` when the field is malformed."""
    if "prompt.npy" not in raw:
        return np.zeros(seq_len, dtype=bool)
    try:
        arr = np.load(io.BytesIO(raw["prompt.npy"]), allow_pickle=False)
    except Exception as err:
        raise CorruptSample(f"sample {raw.get('__key__')!r}: prompt.npy is not a valid .npy ({err})") from None
    if arr.shape != (seq_len,) or arr.dtype.kind not in "biu":
        raise CorruptSample(f"sample {raw.get('__key__')!r}: prompt.npy has shape {arr.shape} dtype {arr.dtype}, "
                            f"expected bool [{seq_len}]")
    return arr.astype(bool, copy=False)
