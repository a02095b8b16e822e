"""Text -> tokens -> packed samples -> webdataset shards + ``manifest.json`` (``tools/prepare_data.py``).

Published only when complete (built in ``<out>.partial/``, see :func:`prepare`). Idempotent and
resumable: shard ``k`` is written as ``{split}-{k:06d}.tar.tmp`` and renamed when
complete, then its sidecar ``{split}-{k:06d}.json`` (samples, tokens, and the exact source position
after its last token) is written the same way. A re-run skips every shard that has its sidecar and
resumes packing at the recorded position (documents before it are read but not tokenized), so an
interrupted run produces byte-identical shards. A directory built with other settings is refused.

:func:`prepare_prompted` writes ready-made fixed-length samples with a per-token prompt mask instead
(e.g. Sudoku: puzzle + separator are the prompt); their manifest says ``"prompt": true``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
import time
from collections import deque
from collections.abc import Iterator
from multiprocessing import get_context
from typing import Any

from udmtrain.data.errors import DataError
from udmtrain.data.manifest import FORMAT_VERSION, MANIFEST_NAME, write_manifest
from udmtrain.data.packing import Packer, PackedSample
from udmtrain.data.shards import encode_sample, shard_name
from udmtrain.data.sources import SourceSpec, SourceStats, iter_documents
from udmtrain.data.tokenizers import Tokenizer, load_tokenizer
from udmtrain.data.webdataset import write_tar

CONFIG_NAME = "prepare_config.json"
SIDECAR_RE = re.compile(r"^(train|valid)-\d{6}\.(tar|json)(\.tmp)?$")
_WORKER_TOKENIZER: Tokenizer | None = None


def _init_worker(spec: str) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = load_tokenizer(spec)


def _encode_chunk(texts: list[str]) -> list[list[int]]:
    assert _WORKER_TOKENIZER is not None
    return _WORKER_TOKENIZER.encode_batch(texts)


def _write_json(path: str, record: dict[str, Any]) -> None:
    with open(path + ".tmp", "w", encoding="utf-8") as handle:
        json.dump(record, handle, indent=1, sort_keys=True)
    os.replace(path + ".tmp", path)


def _read_json(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _finished_shards(out: str, split: str) -> list[dict[str, Any]]:
    """Sidecars of the consecutive finished shards ``0, 1, ...`` of ``split``."""
    done, index = [], 0
    while os.path.isfile(os.path.join(out, f"{split}-{index:06d}.json")) and \
            os.path.isfile(os.path.join(out, shard_name(split, index))):
        done.append(_read_json(os.path.join(out, f"{split}-{index:06d}.json")))
        index += 1
    return done


def _check_config(out: str, config: dict[str, Any], overwrite: bool) -> None:
    """Refuse to mix shards of different settings in one directory."""
    path = os.path.join(out, CONFIG_NAME)
    if os.path.isfile(path) and not overwrite:
        old = _read_json(path)
        diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
        if diff:
            raise DataError(f"{out} already holds shards built with different settings ({', '.join(diff)} "
                            f"differ, see {path}); use another --out, or --overwrite to rebuild")
    if overwrite:
        for name in os.listdir(out):
            if name.endswith((".tar", ".json", ".tmp")):
                os.remove(os.path.join(out, name))
    _write_json(path, config)


def _tokenized(docs: Iterator[str], tokenizer: Tokenizer, start_doc: int, num_workers: int,
               chunk: int = 64) -> Iterator[tuple[int, list[int] | None]]:
    """``(doc_index, ids)``; documents before ``start_doc`` yield ``ids=None`` (not tokenized)."""

    def chunks() -> Iterator[list[str]]:
        batch: list[str] = []
        for index, text in enumerate(docs):
            if index < start_doc:
                continue
            batch.append(text)
            if len(batch) == chunk:
                yield batch
                batch = []
        if batch:
            yield batch

    index = start_doc
    if num_workers <= 0:
        for batch in chunks():
            for ids in tokenizer.encode_batch(batch):
                yield index, ids
                index += 1
        return
    # Bounded in-flight window: Pool.imap would read the whole (possibly huge) source ahead.
    pool = get_context("fork" if sys.platform.startswith("linux") else "spawn").Pool(
        num_workers, initializer=_init_worker, initargs=(tokenizer.spec(),))
    window: deque = deque()
    try:
        for batch in chunks():
            window.append(pool.apply_async(_encode_chunk, (batch,)))
            if len(window) >= 4 * num_workers:
                for ids in window.popleft().get():
                    yield index, ids
                    index += 1
        while window:
            for ids in window.popleft().get():
                yield index, ids
                index += 1
    finally:
        pool.terminate()


def prepare_split(spec: SourceSpec, split: str, tokenizer: Tokenizer, out: str, seq_len: int, packing: str,
                  samples_per_shard: int, num_workers: int, progress: bool) -> dict[str, Any]:
    """Build (or finish) the shards of ``split``; returns its manifest record."""
    done = _finished_shards(out, split)
    stats = SourceStats()
    if done and done[-1].get("final"):
        return _split_record(done, done[-1].get("stats", {}), 0, 0.0)
    start_doc, start_offset = (done[-1]["end_doc"], done[-1]["end_offset"]) if done else (0, 0)
    packer = Packer(seq_len, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, packing)
    pending: list[PackedSample] = []
    index, new_tokens, t0 = len(done), 0, time.perf_counter()
    bar = _progress(progress, split, len(done))
    last_doc = start_doc - 1

    def flush(final: bool) -> None:
        nonlocal index, pending, new_tokens
        if final and not pending and done:  # the last full shard ends the split: mark it final
            done[-1].update(final=True, stats=stats.as_dict(), num_documents=last_doc + 1)
            _write_json(os.path.join(out, f"{split}-{index - 1:06d}.json"), done[-1])
            return
        name = shard_name(split, index)
        keys = [f"{split}-{index:06d}-{i:06d}" for i in range(len(pending))]
        write_tar(os.path.join(out, name + ".tmp"),
                  ((k, encode_sample(s.input_ids, s.doc_ids)) for k, s in zip(keys, pending)))
        os.replace(os.path.join(out, name + ".tmp"), os.path.join(out, name))
        tokens = sum(s.num_tokens for s in pending)
        end = (pending[-1].end_doc, pending[-1].end_offset) if pending else (start_doc, start_offset)
        record = {"name": name, "samples": len(pending), "tokens": tokens, "end_doc": end[0],
                  "end_offset": end[1], "final": final, "num_documents": last_doc + 1}
        if final:
            record["stats"] = stats.as_dict()
        _write_json(os.path.join(out, f"{split}-{index:06d}.json"), record)
        done.append(record)
        new_tokens += tokens
        index, pending = index + 1, []

    for doc, ids in _tokenized(iter_documents(spec, split, stats), tokenizer, start_doc, num_workers):
        last_doc = doc
        pending.extend(packer.add(doc, ids, start_offset if doc == start_doc else 0))
        if bar is not None:
            bar.update(1)
        while len(pending) >= samples_per_shard:
            rest, pending = pending[samples_per_shard:], pending[:samples_per_shard]
            flush(final=False)
            pending = rest
    pending.extend(packer.finish())
    if not done and not pending:
        raise DataError(f"split {split!r} got no documents from the source ({stats.as_dict()}); "
                        "give more input or raise --valid-fraction")
    flush(final=True)
    if bar is not None:
        bar.close()
    return _split_record(done, stats.as_dict(), new_tokens, time.perf_counter() - t0)


def _progress(enabled: bool, split: str, skipped: int):
    """The shared progress display (a bar on a terminal, status lines in logs); documents, total unknown."""
    if not enabled:
        return None
    from udmtrain.utils.progress import progress

    return progress(None, f"{split} documents (resuming after {skipped} shards)" if skipped else f"{split} documents",
                    unit="doc")


def _split_record(done: list[dict[str, Any]], stats: dict[str, Any], new_tokens: int, seconds: float) -> dict[str, Any]:
    shards = [{"name": d["name"], "samples": d["samples"], "tokens": d["tokens"]} for d in done if d["samples"]]
    return {"num_shards": len(shards), "num_samples": sum(s["samples"] for s in shards),
            "num_tokens": sum(s["tokens"] for s in shards), "num_documents": done[-1]["num_documents"],
            "shards": shards, "stats": stats, "tokens_this_run": new_tokens,
            "tokens_per_second": round(new_tokens / seconds, 1) if seconds > 0 else None}


def prepare(spec: SourceSpec, tokenizer_spec: str, seq_len: int, out: str, packing: str = "wrap",
            samples_per_shard: int = 1024, num_workers: int = 0, splits: tuple[str, ...] = ("train", "valid"),
            overwrite: bool = False, progress: bool = True, command: str | None = None) -> dict[str, Any]:
    """Build ``out/{split}-*.tar`` + ``out/manifest.json``; returns the manifest record.

    The shards are written into ``out.partial/`` beside ``out`` and published into ``out`` only when
    every split is complete (the manifest last), so ``out`` never holds a partial data set. An
    interrupted run leaves ``out.partial/``, which the next run resumes; a clean error (e.g. a
    source with no validation documents) removes it. The source is checked before anything is
    written, and the (small) validation split is built first so it cannot fail after the train split.
    A finished split that ``splits`` leaves out keeps its manifest record (it was built with the same
    settings, or :func:`_check_config` would have refused the directory), so ``--splits train`` on a
    finished data set does not drop its validation split.
    """
    if samples_per_shard < 1:
        raise DataError(f"--samples-per-shard must be positive, got {samples_per_shard}")
    if not 0 <= spec.valid_fraction < 1:
        raise DataError(f"--valid-fraction must be in [0, 1), got {spec.valid_fraction}")
    if spec.kind == "files":
        from udmtrain.data.sources import expand_inputs

        expand_inputs(spec.inputs)  # every --input exists and has a supported suffix
    tokenizer = load_tokenizer(tokenizer_spec)
    identity = tokenizer.identity()
    source = spec.describe()
    config = {"source": source, "tokenizer_sha256": identity["sha256"], "tokenizer_name": identity["name"],
              "seq_len": seq_len, "packing": packing, "samples_per_shard": samples_per_shard}
    out = os.path.normpath(out)
    in_place = os.path.isfile(os.path.join(out, CONFIG_NAME)) and not overwrite  # published or legacy partial
    work = out if in_place else out + ".partial"
    os.makedirs(work, exist_ok=True)
    _check_config(work, config, overwrite and not in_place)
    t0 = time.perf_counter()
    try:
        records = {split: prepare_split(spec, split, tokenizer, work, seq_len, packing, samples_per_shard,
                                        num_workers, progress) for split in sorted(splits, key=("valid", "train").index)}
    except DataError:
        if not in_place:
            shutil.rmtree(work, ignore_errors=True)  # deterministic failure: a re-run would fail again
        raise
    records = {split: records[split] for split in splits}
    for split in ("train", "valid"):  # a finished split this run did not ask for stays in the manifest
        done = [] if split in records else _finished_shards(work, split)
        if done and done[-1].get("final"):  # same settings: _check_config refused any other
            records[split] = _split_record(done, done[-1].get("stats", {}), 0, 0.0)
    seconds = time.perf_counter() - t0
    built = {split: r.pop("tokens_this_run") for split, r in records.items()}
    new_tokens = sum(built.values())
    previous: dict[str, Any] = {}
    if in_place:
        with contextlib.suppress(OSError, ValueError):  # none yet, or damaged: this run rewrites it anyway
            previous = _read_json(os.path.join(work, MANIFEST_NAME))
    for split, record in records.items():  # a split with nothing new built (or kept) keeps its measured rate
        if not built[split]:
            record["tokens_per_second"] = previous.get("splits", {}).get(split, {}).get("tokens_per_second")
    recorded = {s["name"]: s for r in previous.get("splits", {}).values() for s in r.get("shards", [])}
    for record in records.values():
        for shard in record["shards"]:
            shard.update(_file_identity(os.path.join(work, shard["name"])))
            _check_unchanged(os.path.join(work, shard["name"]), shard, recorded.get(shard["name"]), command)
    manifest = {"format_version": FORMAT_VERSION, "command": command, "source": source, "tokenizer": identity,
                "vocab_size": tokenizer.vocab_size, "seq_len": seq_len, "packing": packing,
                "samples_per_shard": samples_per_shard, "splits": records,
                "tokens_per_second": round(new_tokens / seconds, 1) if new_tokens else previous.get("tokens_per_second")}
    write_manifest(work, manifest)
    if not in_place:
        _publish(work, out)
    return manifest


def _file_identity(path: str) -> dict[str, Any]:
    """``{"bytes", "sha256"}`` of a shard file, as the manifest records them. Before training the loader
    compares only ``bytes`` (:func:`udmtrain.data.manifest.verify_shard_set`); the sha256 is checked on
    request, by :func:`udmtrain.data.manifest.verify_shard_hashes` (``tools/prepare_data.py --verify``)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return {"bytes": os.path.getsize(path), "sha256": digest.hexdigest()}


def _check_unchanged(path: str, shard: dict[str, Any], recorded: dict[str, Any] | None, command: str | None) -> None:
    """Refuse to re-seal a finished shard whose bytes changed since the manifest recorded them: a re-run
    keeps finished shards, and writing their new hash would hide the damage (rebuilt shards are
    byte-identical, so they always match)."""
    if recorded and recorded.get("sha256") and recorded["sha256"] != shard["sha256"]:
        raise DataError(f"shard {path} changed after it was built (sha256 {shard['sha256'][:16]}..., "
                        f"{shard['bytes']} bytes; {MANIFEST_NAME} records {recorded['sha256'][:16]}..., "
                        f"{recorded.get('bytes')} bytes) and a re-run keeps finished shards; rebuild them with: "
                        f"{command or 'the same command'} --overwrite")


def _publish(work: str, out: str) -> None:
    """Move the finished data set from ``work`` into ``out``: one rename when ``out`` does not exist,
    else old shards and sidecars in ``out`` are replaced file by file and ``manifest.json`` goes last."""
    if not os.path.exists(out):
        os.rename(work, out)
        return
    for name in os.listdir(out):
        if SIDECAR_RE.match(name) or name in (CONFIG_NAME, MANIFEST_NAME):
            os.remove(os.path.join(out, name))
    names = sorted(os.listdir(work), key=lambda n: n == MANIFEST_NAME)
    for name in names:
        os.replace(os.path.join(work, name), os.path.join(out, name))
    os.rmdir(work)
# ---------------------------------------------------------------------------- prompt-conditioned samples
def prepare_prompted(splits: dict[str, Iterator[tuple[Any, Any]]], tokenizer_spec: str, seq_len: int, out: str,
                     source: dict[str, Any], samples_per_shard: int = 1024, overwrite: bool = False,
                     command: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Write fixed-length samples with a prompt mask as shards + ``manifest.json`` (``"prompt": true``).

    ``splits`` maps a split name to an iterator of ``(input_ids int [seq_len], prompt bool [seq_len])``
    (one sample per item, no packing; doc id = the sample's index in its split). Each shard is written
    into ``<out>.partial/``, published into ``out`` only when complete (like :func:`prepare`); a directory
    with the same settings and a finished manifest is left as it is (re-running is a no-op); other
    settings are refused unless ``overwrite``.
    """
    if samples_per_shard < 1:
        raise DataError(f"--samples-per-shard must be positive, got {samples_per_shard}")
    tokenizer = load_tokenizer(tokenizer_spec)
    identity = tokenizer.identity()
    config = {"source": source, "tokenizer_sha256": identity["sha256"], "tokenizer_name": identity["name"],
              "seq_len": seq_len, "packing": "none", "samples_per_shard": samples_per_shard, "prompt": True}
    out = os.path.normpath(out)
    if os.path.isfile(os.path.join(out, CONFIG_NAME)) and not overwrite:
        _check_config(out, config, False)
        if os.path.isfile(os.path.join(out, MANIFEST_NAME)):
            return _read_json(os.path.join(out, MANIFEST_NAME))
    # built in <out>.partial/ and published only when complete, like prepare()
    work = out + ".partial"
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    _check_config(work, config, False)
    try:
        manifest = _write_prompted(splits, tokenizer, identity, work, seq_len, samples_per_shard, source,
                                   command, progress)
    except DataError:
        shutil.rmtree(work, ignore_errors=True)
        raise
    _publish(work, out)
    return manifest


def _write_prompted(splits, tokenizer, identity, out, seq_len, samples_per_shard, source, command,
                    progress) -> dict[str, Any]:
    """The shards and manifest of :func:`prepare_prompted`, written into ``out`` (its work directory)."""
    import numpy as np

    t0, records, total = time.perf_counter(), {}, 0
    for split, items in splits.items():
        shards, pending, count, prompt_tokens, last = [], [], 0, 0, time.perf_counter()

        def flush() -> None:
            name = shard_name(split, len(shards))
            write_tar(os.path.join(out, name + ".tmp"),
                      ((f"{split}-{len(shards):06d}-{i:06d}", sample) for i, sample in enumerate(pending)))
            os.replace(os.path.join(out, name + ".tmp"), os.path.join(out, name))
            shards.append({"name": name, "samples": len(pending), "tokens": len(pending) * seq_len,
                           **_file_identity(os.path.join(out, name))})
            pending.clear()

        for ids, prompt in items:
            ids, prompt = np.asarray(ids, dtype=np.int32), np.asarray(prompt, dtype=bool)
            if ids.shape != (seq_len,) or prompt.shape != (seq_len,):
                raise DataError(f"split {split!r} sample {count}: shapes {ids.shape}/{prompt.shape}, expected "
                                f"[{seq_len}]")
            if int(ids.min()) < 0 or int(ids.max()) >= tokenizer.vocab_size:
                raise DataError(f"split {split!r} sample {count}: token ids outside [0, {tokenizer.vocab_size})")
            pending.append(encode_sample(ids, np.full(seq_len, count, np.int32), prompt))
            count += 1
            prompt_tokens += int(prompt.sum())
            if len(pending) == samples_per_shard:
                flush()
            if progress and time.perf_counter() - last > 5.0:
                last = time.perf_counter()
                print(f"{split}: {count} samples, {count / (last - t0):.0f}/s", file=sys.stderr, flush=True)
        if pending:
            flush()
        if not count:
            raise DataError(f"split {split!r} got no samples; give more input or raise --valid-fraction")
        records[split] = {"num_shards": len(shards), "num_samples": count, "num_tokens": count * seq_len,
                          "num_prompt_tokens": prompt_tokens, "num_documents": count, "shards": shards,
                          "stats": {}}
        total += count
    seconds = time.perf_counter() - t0
    manifest = {"format_version": FORMAT_VERSION, "command": command, "source": source, "tokenizer": identity,
                "vocab_size": tokenizer.vocab_size, "seq_len": seq_len, "packing": "none", "prompt": True,
                "samples_per_shard": samples_per_shard, "splits": records,
                "samples_per_second": round(total / seconds, 1) if seconds > 0 else None}
    write_manifest(out, manifest)
    return manifest
