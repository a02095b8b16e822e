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


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    """A real sentencepiece model (V=800) trained on part of the demo corpus."""
    docs = [t for _, t in list(iter_demo_documents())[:60]]
    out = str(tmp_path_factory.mktemp("sp") / "t.model")
    train_sentencepiece(iter(docs), out, vocab_size=800)
    return out, docs


@pytest.mark.parametrize("damage", ["truncated", "text", "empty"])
def test_damaged_sentencepiece_model_names_the_file_and_the_fix(tmp_path, sp_model, damage):
    """A file sentencepiece cannot parse is a one-line DataError (not 'INTERNAL: could not parse ModelProto')."""
    blob = open(sp_model[0], "rb").read()
    path = tmp_path / "tok.model"
    path.write_bytes({"truncated": blob[:3000], "text": b"not a model\n", "empty": b""}[damage])
    with pytest.raises(DataError) as err:
        load_tokenizer(str(path))
    message = str(err.value)
    assert str(path) in message and "tools/train_tokenizer.py" in message and f"--out {path} --force" in message
    assert "\n" not in message


def test_damaged_gpt2_files_name_the_file(tmp_path):
    (tmp_path / "vocab.json").write_text('{"a": 0, "b"')
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(DataError, match=r"vocab\.json.*cannot be parsed.*restore") as err:
        load_tokenizer(str(tmp_path))
    assert "\n" not in str(err.value)


def test_trained_model_is_written_atomically_and_independent_of_its_path(tmp_path, sp_model):
    """The same text and settings give the same bytes wherever the model goes (sentencepiece would record
    the output path in it), and nothing but the model and its .vocab is left behind."""
    out, docs = sp_model
    other = tmp_path / "elsewhere" / "u.model"
    train_sentencepiece(iter(docs), str(other), vocab_size=800)
    assert other.read_bytes() == open(out, "rb").read()
    assert sorted(p.name for p in other.parent.iterdir()) == ["u.model", "u.vocab"]
    assert (other.parent / "u.vocab").read_text(encoding="utf-8").splitlines()[:2] == ["<unk>\t0", "<s>\t0"]
    before = other.read_bytes()
    with pytest.raises(RuntimeError):  # sentencepiece refuses a vocabulary larger than the text allows
        train_sentencepiece(iter(docs[:2]), str(other), vocab_size=100_000)
    assert other.read_bytes() == before and sorted(p.name for p in other.parent.iterdir()) == ["u.model", "u.vocab"]
