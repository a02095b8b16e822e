"""The ``hf`` tokenizer (``--tokenizer hf:DIR``): a tokenizer.json built offline with the ``tokenizers``
library, its special ids, lossless round trips, the registry/recipe path and prepare_data."""

from __future__ import annotations

import json
import os

import pytest

from udmtrain.data.errors import DataError
from udmtrain.data.prepare import prepare
from udmtrain.data.sources import SourceSpec
from udmtrain.data.tokenizers import HFTokenizer, load_tokenizer
from udmtrain.registry import TOKENIZER

TEXTS = ["the river ran past old mills and quiet towns", "people spoke of weather, trade and music",
         "letters, science and bread in winter harbours", "bridges over the river"] * 5


def make_tokenizer_dir(directory, specials=("<s>", "</s>", "<pad>"), config: dict | None = None) -> str:
    """A byte-level BPE tokenizer trained on TEXTS and saved as directory/tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=list(specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS, trainer=trainer)
    os.makedirs(directory, exist_ok=True)
    tok.save(os.path.join(directory, "tokenizer.json"))
    if config is not None:
        with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f)
    return str(directory)


def test_hf_dir_specials_round_trip_and_spec(tmp_path):
    directory = make_tokenizer_dir(tmp_path / "tok")
    tok = load_tokenizer(f"hf:{directory}")
    assert isinstance(tok, HFTokenizer) and TOKENIZER.get("hf") is HFTokenizer
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)  # <s>, </s>, <pad> in training order
    assert tok.vocab_size == tok._tok.get_vocab_size(with_added_tokens=True) <= 300
    text = "Über the river, 42 bridges!\n\tand tabs"
    ids = tok.encode(text)
    assert ids and not {0, 1, 2} & set(ids)  # no specials added by encode
    assert tok.decode([0] + ids + [1, 2]) == text  # lossless (byte level), specials dropped
    assert tok.encode_batch([text, "river"]) == [ids, tok.encode("river")]
    assert load_tokenizer(tok.spec()).identity() == tok.identity()  # worker processes rebuild it
    ident = tok.identity()
    assert ident["name"] == "hf" and len(ident["sha256"]) == 64 and ident["vocab_size"] == tok.vocab_size


def test_hf_specials_from_tokenizer_config_and_fallbacks(tmp_path):
    named = make_tokenizer_dir(tmp_path / "named", specials=("[A]", "[B]", "[C]"),
                               config={"bos_token": "[B]", "eos_token": {"content": "[A]"}, "pad_token": "[C]"})
    tok = load_tokenizer(f"hf:{named}")
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 0, 2)
    only_eos = make_tokenizer_dir(tmp_path / "eos", specials=("<|endoftext|>",))
    tok = load_tokenizer(f"hf:{only_eos}")
    assert tok.bos_id == tok.eos_id == tok.pad_id == 0  # GPT-2 style: one token for all three
    none = make_tokenizer_dir(tmp_path / "none", specials=("[X]",))
    with pytest.raises(DataError, match="no EOS token"):
        load_tokenizer(f"hf:{none}")


def test_hf_missing_files_are_one_clear_error(tmp_path):
    with pytest.raises(DataError, match="has no tokenizer.json"):
        load_tokenizer(f"hf:{tmp_path}")
    with pytest.raises(DataError, match="does not exist"):
        load_tokenizer(f"hf:{tmp_path}/missing")


def test_prepare_data_with_an_hf_tokenizer(tmp_path):
    directory = make_tokenizer_dir(tmp_path / "tok")
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    manifest = prepare(SourceSpec(kind="files", inputs=[str(corpus)], valid_fraction=0.2), f"hf:{directory}", 16,
                       str(tmp_path / "shards"), samples_per_shard=8, num_workers=0, progress=False)
    tok = load_tokenizer(f"hf:{directory}")
    assert manifest["tokenizer"]["name"] == "hf" and manifest["vocab_size"] == tok.vocab_size
    total = sum(len(tok.encode(t)) + 2 for t in TEXTS)  # BOS + text + EOS per document
    assert sum(s["num_tokens"] for s in manifest["splits"].values()) == total
    # the recipe spelling resolves to the same tokenizer (what check_manifest compares)
    built = TOKENIZER.build("hf", HFTokenizer.Config(path=directory))
    assert built.identity()["sha256"] == manifest["tokenizer"]["sha256"]


@pytest.mark.parametrize("damaged", ["tokenizer.json", "tokenizer_config.json"])
def test_damaged_hf_files_name_the_file(tmp_path, damaged):
    directory = make_tokenizer_dir(tmp_path / "tok", config={"eos_token": "</s>"})
    path = os.path.join(directory, damaged)
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text[: len(text) // 2])
    with pytest.raises(DataError, match=rf"{damaged}.*cannot be parsed") as err:
        load_tokenizer(f"hf:{directory}")
    assert "\n" not in str(err.value)
