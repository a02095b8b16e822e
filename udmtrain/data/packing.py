"""Pack tokenized documents into fixed-length samples.

Every document ``j`` of a split becomes the token sequence ``s_j = [BOS] + encode(text_j) + [EOS]``
with document id ``j`` (its position in the split) on every token. Two modes:

* ``wrap`` (the MDLM protocol): ``s_0 s_1 s_2 ...`` concatenated and cut into blocks of ``seq_len``;
  a block may span documents, and ``doc_ids`` lets attention be restricted to the own document.
  The final partial block is padded instead of dropped, so every token is kept.
* ``pad``: one document per sample: ``s_j`` is cut into ``ceil(|s_j| / seq_len)`` pieces, each
  padded to ``seq_len`` (long documents are split, never truncated).

Padding uses ``pad_id`` with ``doc_id = -1``; ``num_tokens`` counts the non-padding positions, so
the split's token total is ``sum_j |s_j| = sum_j (len(encode(text_j)) + 2)``.

Each sample records where it starts, ``(start_doc, start_offset)`` = (document index, offset
within ``s_j``); a packer fed ``s_j[start_offset:]`` and then the following documents reproduces
the same samples, which is how an interrupted ``prepare_data`` resumes a shard exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from udmtrain.data.errors import DataError

PACKING_MODES = ("wrap", "pad")


@dataclass
class PackedSample:
    """One sample: ``input_ids``/``doc_ids`` int32 ``[seq_len]`` and where it starts in the split."""

    input_ids: np.ndarray
    doc_ids: np.ndarray
    start_doc: int
    start_offset: int
    end_doc: int
    end_offset: int
    num_tokens: int


class Packer:
    """Turns ``(doc_index, ids)`` into :class:`PackedSample` s (see the module docstring)."""

    def __init__(self, seq_len: int, bos_id: int, eos_id: int, pad_id: int, mode: str = "wrap") -> None:
        if mode not in PACKING_MODES:
            raise DataError(f"--packing must be one of {PACKING_MODES}, got {mode!r}")
        if seq_len < 2:
            raise DataError(f"--seq-len must be at least 2, got {seq_len}")
        self.seq_len, self.mode = seq_len, mode
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        # wrap mode: pending segments (doc, offset_of_first_token, ids) not yet emitted
        self._pending: list[tuple[int, int, np.ndarray]] = []
        self._pending_len = 0

    def _sequence(self, ids: Sequence[int]) -> np.ndarray:
        seq = np.empty(len(ids) + 2, dtype=np.int32)
        seq[0], seq[-1] = self.bos_id, self.eos_id
        seq[1:-1] = ids
        return seq

    def _padded(self, tokens: np.ndarray, docs: np.ndarray, start: tuple[int, int],
                end: tuple[int, int]) -> PackedSample:
        n = len(tokens)
        ids = np.full(self.seq_len, self.pad_id, dtype=np.int32)
        doc_ids = np.full(self.seq_len, -1, dtype=np.int32)
        ids[:n], doc_ids[:n] = tokens, docs
        return PackedSample(ids, doc_ids, start[0], start[1], end[0], end[1], n)

    def add(self, doc_index: int, ids: Sequence[int], offset: int = 0) -> list[PackedSample]:
        """Feed document ``doc_index`` (token ids without BOS/EOS), skipping its first ``offset``
        wrapped tokens (resume); returns the samples completed by it."""
        seq = self._sequence(ids)[offset:]
        if self.mode == "pad":
            out = []
            for start in range(0, len(seq), self.seq_len):
                piece = seq[start:start + self.seq_len]
                out.append(self._padded(piece, np.full(len(piece), doc_index, np.int32),
                                        (doc_index, offset + start), (doc_index, offset + start + len(piece))))
            return out
        if len(seq) == 0:
            return []
        self._pending.append((doc_index, offset, seq))
        self._pending_len += len(seq)
        out = []
        while self._pending_len >= self.seq_len:
            out.append(self._take(self.seq_len))
        return out

    def _take(self, n: int) -> PackedSample:
        """Pop the first ``n`` pending tokens (wrap mode) as one sample."""
        start = (self._pending[0][0], self._pending[0][1])
        toks, docs, need = [], [], n
        while need > 0 and self._pending:
            doc, off, seq = self._pending[0]
            piece = seq[:need]
            toks.append(piece)
            docs.append(np.full(len(piece), doc, np.int32))
            need -= len(piece)
            end = (doc, off + len(piece))
            if len(piece) == len(seq):
                self._pending.pop(0)
            else:
                self._pending[0] = (doc, off + len(piece), seq[len(piece):])
        self._pending_len -= n - need
        return self._padded(np.concatenate(toks), np.concatenate(docs), start, end)

    def finish(self) -> list[PackedSample]:
        """The final, padded partial block (wrap mode), if any tokens are left."""
        if self.mode == "wrap" and self._pending_len > 0:
            return [self._take(self._pending_len)]
        return []
