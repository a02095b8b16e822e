"""Streaming train/valid loaders over webdataset shards, with an exactly resumable cursor.

Train stream of rank ``r`` (of ``R``) with ``W`` logical workers (``W = max(1, num_workers)``, capped
by the shards per rank):

1. epoch ``e``: shards permuted by ``(seed, e)``; worker ``w`` reads ``order[r::R][w::W]`` in order
   (:mod:`udmtrain.data.shards`), so each shard is read by exactly one (rank, worker) per epoch;
2. the worker's raw samples pass through a shuffle buffer of ``shuffle_buffer`` samples driven by a
   generator seeded by ``(seed, e, r, w)``; the buffer is drained at the end of each epoch, so an
   epoch emits each of its samples exactly once;
3. the worker cuts its stream into batches of ``batch_size``; the DataLoader hands batches out
   round-robin, worker ``(k + rotation) mod W`` producing the ``k``-th batch.

Cursor (``state_dict()``): for each logical worker ``(epoch, samples emitted in that epoch)`` as of
the last batch *consumed by the caller* (prefetched batches do not count), plus the logical worker
that produces the next batch. ``load_state_dict()`` restarts each worker at its epoch, replays its
shuffle and skips the emitted samples without decoding them, and rotates the worker roles so the
round-robin continues where it stopped. Guarantee: with the same shards, seed, world size, batch
size and num_workers, a resumed run yields exactly the batches the uninterrupted run would have
yielded — no sample repeated or skipped (tested). The cost of a resume is re-reading, per worker, the
part of its current epoch's shards already consumed. A different world size or num_workers is
refused (the stream would differ).

Valid stream: shards in order, rank ``r`` reads ``shards[r::R]``, one pass, no shuffle, every
sample exactly once across ranks. Every rank yields the same number of batches,
``ceil(max_r n_r / batch_size)`` with ``n_r`` from the manifest, filling the tail with
``valid=False`` rows (input ``pad_id``, doc id -1, sample id ``""``), so collective ops in the
evaluator stay matched. Validation reads in the calling process (no workers).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from udmtrain.data.errors import DataError
from udmtrain.data.manifest import load_manifest, manifest_path_for, verify_shard_set
from udmtrain.data.shards import CorruptSample, assign, decode_prompt, decode_sample, epoch_order, resolve_shards
from udmtrain.data.webdataset import iter_raw_samples

log = logging.getLogger("udmtrain.data")
STATE_VERSION = 1
RESUME_KEYS = {  # cursor field -> the setting behind it, for the error of a resume with other settings
    "world_size": "world size {saved} (the launcher's --num_gpus/--num_nodes; this run has {mine})",
    "rank": "rank {saved} (this process is rank {mine})",
    "batch_size": "engine.micro_batch_size={saved} (this run: {mine})",
    "num_logical_workers": "data.num_workers={saved} (this run: {mine})",
    "seed": "run.seed={saved} (this run: {mine})",
    "num_shards": "{saved} train shards (data.train_shards; this run selects {mine})",
}


class _CorruptPolicy:
    """webdataset error handler: ``fail`` raises a DataError naming the shard; ``skip`` counts and logs."""

    def __init__(self, on_corrupt: str, url: str) -> None:
        if on_corrupt not in ("fail", "skip"):
            raise DataError(f"data.on_corrupt must be 'fail' or 'skip', got {on_corrupt!r}")
        self.on_corrupt, self.url, self.count = on_corrupt, url, 0

    def __call__(self, exn: Exception) -> bool:
        if self.on_corrupt == "fail":
            what = str(exn) if isinstance(exn, (CorruptSample, DataError)) else f"{type(exn).__name__}: {exn}"
            raise DataError(f"shard {self.url}: {what}; rebuild it with tools/prepare_data.py, or set "
                            "data.on_corrupt: skip to skip and count bad samples") from None
        self.count += 1
        log.warning("skipping corrupt data in shard %s: %s: %s", self.url, type(exn).__name__, exn)
        return True


def _shard_samples(url: str, seq_len: int, on_corrupt: str, counter: list[int], decode: bool,
                   expected: int | None = None, vocab_size: int | None = None) -> Iterator[dict[str, Any]]:
    """Raw samples of one shard; with ``decode`` they are decoded and checked (corrupt ones handled).

    ``expected`` (the manifest's count): a shard that ends after another number of samples without a
    read error (a tar cut at a member boundary, a replaced file) is corrupt too.
    """
    policy = _CorruptPolicy(on_corrupt, url)
    read = 0
    try:
        for raw in iter_raw_samples(url, policy):
            read += 1
            if decode:
                try:
                    raw["_arrays"] = (*decode_sample(raw, seq_len, vocab_size), decode_prompt(raw, seq_len))
                except CorruptSample as err:
                    policy(err)
                    continue
            yield raw
        if expected is not None and read != expected and policy.count == 0:
            policy(DataError(f"holds {read} samples but the manifest lists {expected} (truncated or replaced)"))
    finally:
        counter[0] += policy.count


def _shuffled(stream: Iterator[Any], size: int, rng: np.random.Generator) -> Iterator[Any]:
    """Reservoir-style shuffle buffer: keep ``size`` items, emit a uniformly chosen one per arrival."""
    if size <= 1:
        yield from stream
        return
    buffer: list[Any] = []
    for item in stream:
        if len(buffer) < size:
            buffer.append(item)
            continue
        j = int(rng.integers(size))
        buffer[j], item = item, buffer[j]
        yield item
    for j in rng.permutation(len(buffer)):
        yield buffer[int(j)]


class _TrainStream(torch.utils.data.IterableDataset):
    """Batches of one logical worker (or all of them, round-robin, inside DataLoader workers)."""

    def __init__(self, urls: list[str], seq_len: int, batch_size: int, seed: int, rank: int, world_size: int,
                 num_logical: int, shuffle: bool, shuffle_buffer: int, on_corrupt: str,
                 cursors: list[tuple[int, int]], rotation: int, shard_samples: dict[str, int] | None = None,
                 vocab_size: int | None = None) -> None:
        self.urls, self.seq_len, self.batch_size, self.seed = urls, seq_len, batch_size, seed
        self.shard_samples, self.vocab_size = shard_samples or {}, vocab_size
        self.rank, self.world_size, self.num_logical = rank, world_size, num_logical
        self.shuffle, self.shuffle_buffer, self.on_corrupt = shuffle, shuffle_buffer, on_corrupt
        self.cursors, self.rotation = cursors, rotation

    def _samples(self, worker: int) -> Iterator[tuple[int, int, dict[str, Any], list[int]]]:
        """``(epoch, emitted_in_epoch, raw, corrupt_counter)`` from the worker's cursor on, forever."""
        epoch, skip = self.cursors[worker]
        counter = [0]
        while True:
            order = epoch_order(len(self.urls), self.seed, epoch, self.shuffle)
            mine = [self.urls[i] for i in assign(order, self.rank, self.world_size, worker, self.num_logical)]
            rng = np.random.default_rng([self.seed, epoch, self.rank, worker])
            raw = (s for url in mine for s in _shard_samples(url, self.seq_len, self.on_corrupt, counter, False,
                                                             self.shard_samples.get(url)))
            emitted = 0
            for sample in _shuffled(raw, self.shuffle_buffer if self.shuffle else 0, rng):
                emitted += 1
                if emitted <= skip:
                    continue  # resume: replayed, not decoded
                yield epoch, emitted, sample, counter
            if emitted == 0:
                raise DataError(f"rank {self.rank} worker {worker} read no sample in epoch {epoch} from "
                                f"{len(mine)} shards (all missing or corrupt?)")
            epoch, skip = epoch + 1, 0

    def _batches(self, worker: int) -> Iterator[dict[str, Any]]:
        ids, docs, prompts, keys, reported = [], [], [], [], 0
        for epoch, emitted, raw, counter in self._samples(worker):
            try:
                arrays = (*decode_sample(raw, self.seq_len, self.vocab_size), decode_prompt(raw, self.seq_len))
            except CorruptSample as err:
                _CorruptPolicy(self.on_corrupt, raw.get("__url__", "?"))(err)
                counter[0] += 1
                arrays = None
            if arrays is not None:
                ids.append(arrays[0])
                docs.append(arrays[1])
                prompts.append(arrays[2])
                keys.append(raw["__key__"])
            if len(keys) == self.batch_size:
                yield {"input_ids": torch.from_numpy(np.stack(ids)).long(),
                       "doc_ids": torch.from_numpy(np.stack(docs)).long(),
                       "prompt": torch.from_numpy(np.stack(prompts)),
                       "sample_ids": keys, "_cursor": (worker, epoch, emitted), "_corrupt": counter[0] - reported}
                reported = counter[0]
                ids, docs, prompts, keys = [], [], [], []

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        physical = info.id if info is not None else 0
        try:
            yield from self._batches((physical + self.rotation) % self.num_logical)
        except DataError as err:  # handed over as data: a DataLoader would wrap it in a worker traceback
            yield {"_error": str(err)}


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: workers ignore SIGINT and SIGTERM. Ctrl-C and launchers signal the
    whole process group; a worker that died of it made the next batch raise before the training process
    could act on the signal (finish the step, save, exit), so nothing was saved. The main process stops
    the workers itself (``close``), and PyTorch's workers exit on their own when it dies."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class TrainLoader:
    """Infinite iterator of training batches with ``state_dict()``/``load_state_dict()`` (see module doc)."""

    def __init__(self, urls: list[str], seq_len: int, batch_size: int, rank: int, world_size: int, seed: int,
                 num_workers: int, shuffle_buffer: int, on_corrupt: str, shuffle: bool = True,
                 shard_samples: dict[str, int] | None = None, vocab_size: int | None = None) -> None:
        self.shard_samples, self.vocab_size = shard_samples, vocab_size
        if len(urls) < world_size:
            raise DataError(f"{len(urls)} train shards cannot feed {world_size} ranks (each rank needs at "
                            "least one shard per epoch); re-run prepare_data with a smaller --samples-per-shard")
        per_rank = len(urls) // world_size
        self.num_logical = max(1, min(num_workers, per_rank))
        if num_workers > per_rank:
            log.warning("data.num_workers=%d reduced to %d: only %d shards per rank", num_workers,
                        self.num_logical, per_rank)
        self.num_workers = self.num_logical if num_workers > 0 else 0
        self.urls, self.seq_len, self.batch_size = urls, seq_len, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle_buffer, self.on_corrupt, self.shuffle = shuffle_buffer, on_corrupt, shuffle
        self.cursors = [(0, 0)] * self.num_logical
        self.next_worker = 0
        self.num_corrupt = 0
        self._it: Iterator[dict[str, Any]] | None = None
        self._loader = None

    def _start(self) -> None:
        stream = _TrainStream(self.urls, self.seq_len, self.batch_size, self.seed, self.rank, self.world_size,
                              self.num_logical, self.shuffle, self.shuffle_buffer, self.on_corrupt,
                              list(self.cursors), self.next_worker, self.shard_samples, self.vocab_size)
        if self.num_workers == 0:
            self._it = iter(stream)
        else:
            # a private generator for the DataLoader's worker base seed (unused: the stream seeds itself),
            # so starting the workers never draws from the global RNG a resume has just restored
            self._loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=self.num_workers,
                                                       prefetch_factor=2, worker_init_fn=ignore_stop_signals,
                                                       generator=torch.Generator().manual_seed(self.seed))
            self._it = iter(self._loader)

    def __iter__(self) -> TrainLoader:
        return self

    def __next__(self) -> dict[str, Any]:
        """The next batch ``{"input_ids", "doc_ids": LongTensor[B,L], "valid", "prompt": BoolTensor[B,L],
        "sample_ids": list[str]}`` (``prompt``: clean conditioning positions, all False without them)."""
        if self._it is None:
            self._start()
        batch = next(self._it)
        if "_error" in batch:
            self.close()
            raise DataError(batch["_error"])
        worker, epoch, emitted = batch.pop("_cursor")
        self.num_corrupt += batch.pop("_corrupt")
        self.cursors[worker] = (epoch, emitted)
        self.next_worker = (worker + 1) % self.num_logical
        batch["valid"] = batch["doc_ids"] >= 0
        return batch

    def state_dict(self) -> dict[str, Any]:
        """The cursor: per logical worker ``[epoch, samples emitted in it]``, the next worker, and the
        settings a resume must match."""
        return {"version": STATE_VERSION, "cursors": [list(c) for c in self.cursors],
                "next_worker": self.next_worker, "world_size": self.world_size, "rank": self.rank,
                "num_logical_workers": self.num_logical, "batch_size": self.batch_size, "seed": self.seed,
                "num_shards": len(self.urls), "num_corrupt": self.num_corrupt}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict` output; refuses a stream that would not be identical, naming each
        setting that differs as the user sets it (``RESUME_KEYS``) with the value that resumes exactly."""
        differ = []
        for key, mine in (("world_size", self.world_size), ("rank", self.rank), ("batch_size", self.batch_size),
                          ("num_logical_workers", self.num_logical), ("seed", self.seed),
                          ("num_shards", len(self.urls))):
            saved = state.get(key)
            if saved != mine:
                if key == "num_logical_workers":  # as set: 0 and 1 read the same single stream
                    saved, mine = ("1 (or 0)" if saved == 1 else saved), self.num_workers
                differ.append(RESUME_KEYS[key].format(saved=saved, mine=mine))
        if differ:
            raise DataError(f"the checkpoint's data stream was read with {', '.join(differ)}; set "
                            f"{'these' if len(differ) > 1 else 'that'} to resume exactly where it stopped, or start "
                            "a new run (checkpoint.resume=never and a new run.name)")
        self.close()
        self.cursors = [(int(e), int(n)) for e, n in state["cursors"]]
        self.next_worker = int(state["next_worker"])
        self.num_corrupt = int(state.get("num_corrupt", 0))

    def close(self) -> None:
        """Stop worker processes (a new iterator starts on the next ``next()``)."""
        if self._loader is not None:
            del self._it
            self._loader = None
        self._it = None


class ValidLoader:
    """One pass over the validation shards per ``iter()`` (see module doc)."""

    def __init__(self, urls: list[str], shard_samples: dict[str, int], seq_len: int, batch_size: int,
                 rank: int, world_size: int, pad_id: int, on_corrupt: str, vocab_size: int | None = None) -> None:
        self.urls, self.seq_len, self.batch_size = urls, seq_len, batch_size
        self.shard_samples, self.vocab_size = shard_samples, vocab_size
        self.rank, self.world_size, self.pad_id, self.on_corrupt = rank, world_size, pad_id, on_corrupt
        counts = []
        for r in range(world_size):
            mine = urls[r::world_size]
            unknown = [u for u in mine if os.path.basename(u) not in shard_samples]
            if unknown:
                raise DataError(f"validation shard {unknown[0]} is not listed in the manifest; "
                                "shards and manifest.json must come from the same prepare_data run")
            counts.append(sum(shard_samples[os.path.basename(u)] for u in mine))
        self.num_samples = counts[rank]
        self.num_batches = math.ceil(max(counts) / batch_size) if counts else 0
        self.num_corrupt = 0

    def __len__(self) -> int:
        return self.num_batches

    def _batch(self, rows: list[tuple[np.ndarray, np.ndarray, np.ndarray, str]]) -> dict[str, Any]:
        n_pad = self.batch_size - len(rows)
        ids = [r[0] for r in rows] + [np.full(self.seq_len, self.pad_id, np.int32)] * n_pad
        docs = [r[1] for r in rows] + [np.full(self.seq_len, -1, np.int32)] * n_pad
        prompts = [r[2] for r in rows] + [np.zeros(self.seq_len, bool)] * n_pad
        doc_ids = torch.from_numpy(np.stack(docs)).long()
        return {"input_ids": torch.from_numpy(np.stack(ids)).long(), "doc_ids": doc_ids,
                "valid": doc_ids >= 0, "prompt": torch.from_numpy(np.stack(prompts)),
                "sample_ids": [r[-1] for r in rows] + [""] * n_pad}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        counter = [0]
        rows: list[tuple[np.ndarray, np.ndarray, np.ndarray, str]] = []
        produced = 0
        for url in self.urls[self.rank::self.world_size]:
            expected = self.shard_samples[os.path.basename(url)]
            for raw in _shard_samples(url, self.seq_len, self.on_corrupt, counter, True, expected, self.vocab_size):
                rows.append((*raw["_arrays"], raw["__key__"]))
                if len(rows) == self.batch_size:
                    produced += 1
                    if produced > self.num_batches:
                        raise DataError(f"validation shard {url} holds more samples than its manifest says")
                    yield self._batch(rows)
                    rows = []
        if rows:
            produced += 1
            yield self._batch(rows)
        self.num_corrupt = counter[0]
        for _ in range(self.num_batches - produced):
            yield self._batch([])


def _settings(data_cfg: Any) -> dict[str, Any]:
    if not getattr(data_cfg, "allow_shell_urls", False):
        for key in ("train_shards", "valid_shards"):
            spec = getattr(data_cfg, key, None)
            for item in spec if isinstance(spec, (list, tuple)) else [spec]:
                if str(item or "").strip().startswith("pipe:"):
                    raise DataError(f"data.{key}={item!r} runs a shell command; set data.allow_shell_urls=true "
                                    "if you trust it")
    return {"seq_len": int(data_cfg.seq_len), "num_workers": int(getattr(data_cfg, "num_workers", 0) or 0),
            "shuffle_buffer": int(getattr(data_cfg, "shuffle_buffer", 0) or 0),
            "on_corrupt": str(getattr(data_cfg, "on_corrupt", "fail")),
            "shuffle": bool(getattr(data_cfg, "shuffle", True))}


def build_train_loader(data_cfg: Any, batch_size: int, rank: int, world_size: int, seed: int) -> TrainLoader:
    """Infinite, exactly resumable training loader of rank ``rank`` (see the module docstring).

    ``data_cfg`` needs ``train_shards, seq_len, shuffle_buffer, num_workers, on_corrupt``.
    """
    s = _settings(data_cfg)
    urls = resolve_shards(data_cfg.train_shards, "train")
    manifest = load_manifest(manifest_path_for(data_cfg.train_shards, getattr(data_cfg, "manifest", None)))
    counts = verify_shard_set(manifest, data_cfg.train_shards, urls, "train", s["on_corrupt"])
    return TrainLoader(urls, s["seq_len"], batch_size, rank, world_size, seed, s["num_workers"],
                       s["shuffle_buffer"], s["on_corrupt"], s["shuffle"], counts, manifest.vocab_size)


def build_valid_loader(data_cfg: Any, batch_size: int, rank: int, world_size: int) -> ValidLoader:
    """One-pass validation loader: every sample exactly once across ranks, equal batch counts per rank."""
    s = _settings(data_cfg)
    urls = resolve_shards(data_cfg.valid_shards, "valid")
    manifest = load_manifest(manifest_path_for(data_cfg.valid_shards, getattr(data_cfg, "manifest", None)))
    verify_shard_set(manifest, data_cfg.valid_shards, urls, "valid", s["on_corrupt"])
    return ValidLoader(urls, manifest.shard_samples("valid"), s["seq_len"], batch_size, rank, world_size,
                       manifest.pad_id, s["on_corrupt"], manifest.vocab_size)
