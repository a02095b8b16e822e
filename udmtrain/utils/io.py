"""Atomic file writes: a reader (or a crash) never sees a half-written result."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import IO


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open ``path.tmp-<pid>`` for writing; on success fsync and ``os.replace`` it onto ``path``.

    On an exception the temporary file is removed and an existing ``path`` is left untouched.
    Parent directories are created.
    """
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (see ``atomic_open``)."""
    with atomic_open(path) as f:
        f.write(text)


class UnsafeFileError(ValueError):
    """A ``.pt`` file that holds something other than tensors and plain containers.

    Loading it would need Python's pickle, which can run arbitrary code, so it is refused.
    """


def _legacy_numpy_globals() -> list:
    """NumPy's array reconstruction, which old checkpoints need for the NumPy RNG state.

    Safe to allow: an array's bytes are data, and any object it holds goes through the same
    restricted unpickler.
    """
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        return []
    core = getattr(np, "_core", None) or np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def load_tensors(path: str | os.PathLike, allow: tuple = (), mmap: bool = False) -> object:
    """``torch.load(path, weights_only=True)``: tensors, numbers, strings and plain containers only.

    ``allow`` names extra classes known to be inert (e.g. DeepSpeed's loss scaler). ``mmap`` maps
    the tensor data instead of reading it (a cheap scan of a large file). Anything else in the file
    (a pickled object whose ``__reduce__`` would run code) raises :class:`UnsafeFileError` naming the
    file and the refused global; nothing from the file is executed.
    """
    import pickle

    import torch

    path = os.fspath(path)
    try:
        with torch.serialization.safe_globals([*_legacy_numpy_globals(), *allow]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        detail = str(err).split("\n")
        refused = next((line.strip() for line in detail if "GLOBAL" in line or "Unsupported" in line), detail[0])
        raise UnsafeFileError(
            f"{path} holds a Python object that only pickle could load ({refused[:160]}); refused because "
            "unpickling can run arbitrary code. udmtrain writes only tensors and plain containers: take "
            "checkpoints only from sources you trust (see docs/security.md)") from None
    except RuntimeError as err:  # not a torch file / truncated zip
        raise UnsafeFileError(f"{path} is not a readable torch file ({str(err).splitlines()[0][:160]}); "
                              "the checkpoint is damaged or was not written by udmtrain") from None


def check_writable(path: str | os.PathLike, flag: str, directory: bool = False) -> None:
    """Fail fast (before any expensive work) if output ``path`` cannot be created or written.

    ``directory``: ``path`` is a directory to create (or reuse); else a file. Probes by creating and
    removing a temporary file in the nearest existing directory on the way to ``path`` (nothing is
    left behind), so a read-only place, a parent that is a file, or missing permissions raise
    :class:`OutputError` naming ``flag``.
    """
    path = os.path.abspath(os.fspath(path))
    if not directory and os.path.isdir(path):
        raise OutputError(f"{flag} {path} is a directory; give a file path")
    if directory and os.path.exists(path) and not os.path.isdir(path):
        raise OutputError(f"{flag} {path} exists and is not a directory; choose another path")
    existing = path if directory else os.path.dirname(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise OutputError(f"{flag} {path} cannot be created: {existing} is a file; choose another path")
    probe = os.path.join(existing, f".udmtrain-write-probe-{os.getpid()}")
    try:
        with open(probe, "w", encoding="utf-8"):
            pass
        os.remove(probe)
    except OSError as err:
        raise OutputError(f"{flag} {path} cannot be written ({err.strerror or err} in {existing}); choose a "
                          "writable location") from None


class OutputError(ValueError):
    """An output location (``--out`` and the like) that cannot be written."""


LOCK_NAME = ".udmtrain.lock"
"""The file a running training run holds an exclusive ``flock`` on, inside its run directory."""


def lock_directory(path: str | os.PathLike, what: str = "run directory") -> IO | None:
    """Create ``path`` and take an exclusive, non-blocking advisory lock on ``path/.udmtrain.lock``.

    The lock lasts while the returned file stays open and ends with the process however it ends (the
    kernel drops ``flock`` locks of a killed process), so it never goes stale. A lock another process
    holds raises :class:`OutputError` naming that process (pid and host, written into the file). None
    where the filesystem offers no locks (some network filesystems): then nothing is guarded.
    """
    import fcntl
    import socket

    os.makedirs(path, exist_ok=True)
    lock_path = os.path.join(path, LOCK_NAME)
    handle = open(lock_path, "a+", encoding="utf-8")  # noqa: SIM115 (held open on purpose)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise OutputError(f"{what} {path} is in use by a running run ({holder}); two runs writing one directory "
                          "would overwrite each other's checkpoints and metrics: wait for it to finish, stop it, "
                          "or pick another run.name") from None
    except OSError:
        handle.close()
        return None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    return handle
