"""Packing: exact wrap/pad layouts, doc ids, token totals and exact resume from a recorded position."""

from __future__ import annotations

import numpy as np
import pytest

from udmtrain.data.errors import DataError
from udmtrain.data.packing import Packer

BOS, EOS, PAD = 1, 2, 0
DOCS = [[10, 11, 12], [20], [30, 31, 32, 33, 34, 35, 36], [], [40, 41]]


def run(mode: str, seq_len: int, docs=DOCS):
    packer = Packer(seq_len, BOS, EOS, PAD, mode)
    out = [s for j, ids in enumerate(docs) for s in packer.add(j, ids)]
    return out + packer.finish()


def test_wrap_is_the_concatenation_cut_into_blocks():
    samples = run("wrap", 5)
    stream = [t for ids in DOCS for t in [BOS, *ids, EOS]]
    docs = [j for j, ids in enumerate(DOCS) for _ in range(len(ids) + 2)]
    flat = np.concatenate([s.input_ids[: s.num_tokens] for s in samples])
    assert flat.tolist() == stream
    assert np.concatenate([s.doc_ids[: s.num_tokens] for s in samples]).tolist() == docs
    assert sum(s.num_tokens for s in samples) == sum(len(d) + 2 for d in DOCS)
    last = samples[-1]  # padded tail: pad id with doc id -1
    assert last.num_tokens == len(stream) % 5
    assert (last.input_ids[last.num_tokens:] == PAD).all() and (last.doc_ids[last.num_tokens:] == -1).all()
    assert all(s.input_ids.dtype == np.int32 and s.input_ids.shape == (5,) for s in samples)


def test_pad_mode_one_document_per_sample_and_long_documents_split():
    samples = run("pad", 4)
    assert [s.input_ids.tolist() for s in samples[:2]] == [[BOS, 10, 11, 12], [EOS, PAD, PAD, PAD]]
    assert all(len(set(s.doc_ids[: s.num_tokens].tolist())) == 1 for s in samples)
    assert sum(s.num_tokens for s in samples) == sum(len(d) + 2 for d in DOCS)


@pytest.mark.parametrize("mode", ["wrap", "pad"])
def test_resume_from_any_sample_boundary_reproduces_the_rest(mode):
    full = run(mode, 3)
    for k in range(1, len(full)):
        doc, off = full[k - 1].end_doc, full[k - 1].end_offset
        packer = Packer(3, BOS, EOS, PAD, mode)
        rest = [s for j, ids in enumerate(DOCS) if j >= doc for s in packer.add(j, ids, off if j == doc else 0)]
        rest += packer.finish()
        assert [s.input_ids.tolist() for s in rest] == [s.input_ids.tolist() for s in full[k:]]
        assert [s.doc_ids.tolist() for s in rest] == [s.doc_ids.tolist() for s in full[k:]]


def test_bad_settings():
    with pytest.raises(DataError, match="--packing"):
        Packer(8, BOS, EOS, PAD, "concat")
    with pytest.raises(DataError, match="--seq-len"):
        Packer(1, BOS, EOS, PAD, "wrap")
