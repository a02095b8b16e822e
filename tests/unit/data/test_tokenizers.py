"""Tokenizers: GPT-2 ids and specials, lossless sentencepiece round trips, identity hashes."""

from __future__ import annotations

import pytest

from udmtrain.data.demo_corpus import iter_demo_documents
from udmtrain.data.errors import DataError
from udmtrain.data.tokenizers import GPT2Tokenizer, SentencePieceTokenizer, load_tokenizer, train_sentencepiece
from udmtrain.registry import TOKENIZER

TRICKY = "  Leading spaces,\ttabs\n\n\nnewlines, ünïcödé, 数学, emoji 🙂, <|endoftext|> and   runs   "


def test_registry_names_and_configs():
    assert {"gpt2", "sentencepiece"} <= set(TOKENIZER.names())
    assert TOKENIZER.get("gpt2") is GPT2Tokenizer and GPT2Tokenizer.Config().path == "gpt2"
    with pytest.raises(TypeError):
        SentencePieceTokenizer.Config()  # path is required


def test_gpt2_ids_specials_and_round_trip(gpt2):
    assert gpt2.vocab_size == 50257
    assert gpt2.bos_id == gpt2.eos_id == gpt2.pad_id == 50256
    assert gpt2.encode("Hello world") == [15496, 995]  # the published GPT-2 ids
    ids = gpt2.encode(TRICKY)
    assert 50256 not in ids  # literal <|endoftext|> is plain text
    assert gpt2.decode(ids) == TRICKY
    assert gpt2.decode([50256] + ids + [50256]) == TRICKY
    ident = gpt2.identity()
    assert ident["name"] == "gpt2" and len(ident["sha256"]) == 64


def test_gpt2_bad_directory(tmp_path):
    with pytest.raises(DataError, match="neither vocab.json"):
        load_tokenizer(str(tmp_path))


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_sentencepiece_train_is_lossless(tmp_path, model_type):
    docs = [t for _, t in list(iter_demo_documents())[:60]]
    tok = train_sentencepiece(iter(docs), str(tmp_path / "t.model"), vocab_size=800, model_type=model_type)
    assert tok.vocab_size == 800
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3)
    for text in [TRICKY, docs[3], "\x00\x7f control \u200b zero-width"]:
        ids = tok.encode(text)
        assert max(ids) < tok.vocab_size
        assert tok.decode(ids) == text
    again = load_tokenizer(str(tmp_path / "t.model"))
    assert again.identity()["sha256"] == tok.identity()["sha256"]


def test_sentencepiece_missing_model_names_the_fix(tmp_path):
    with pytest.raises(DataError, match="train_tokenizer.py"):
        load_tokenizer(str(tmp_path / "nope.model"))
