"""The only module that imports ``webdataset``: writing tar shards and reading their raw samples.

A sample is stored as ``{key}.input_ids.npy`` and ``{key}.doc_ids.npy`` (int32 ``[seq_len]``).
Shard locations are anything ``webdataset.gopen`` opens: local paths, ``file:``, ``http(s):`` and
``pipe:COMMAND`` (e.g. ``pipe:aws s3 cp s3://bucket/train-000000.tar -`` for object stores).
Decoding and validation live in :mod:`udmtrain.data.shards` so that they are testable without tars.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import webdataset as wds


def write_tar(path: str, samples: Iterable[tuple[str, dict[str, bytes]]]) -> None:
    """Write ``(key, {extension: bytes})`` samples to the tar file ``path`` (overwritten).

    Member times are fixed (mtime 0) so that a rebuilt shard is byte-identical to the original.
    """
    with wds.TarWriter(path, mtime=0.0) as sink:
        for key, fields in samples:
            sink.write({"__key__": key, **fields})


def iter_raw_samples(url: str, on_error: Callable[[Exception], bool]) -> Iterator[dict[str, bytes]]:
    """Raw samples ``{"__key__", "input_ids.npy": bytes, ...}`` of one shard, in file order.

    ``on_error(exception)`` decides what a read error (unopenable URL, truncated tar, broken header)
    does: return True to continue with what follows, False to stop, or raise.
    """
    yield from wds.tarfile_samples([{"url": url}], handler=on_error)
