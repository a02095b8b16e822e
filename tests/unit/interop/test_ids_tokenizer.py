"""The ``ids`` tokenizer that keeps an import usable at the token-id level (``--tokenizer none``)."""

from __future__ import annotations

import pytest

from udmtrain.data.errors import DataError
from udmtrain.data.tokenizers import IdsTokenizer, load_tokenizer
from udmtrain.registry import TOKENIZER


def test_ids_round_trip_spec_and_identity():
    tok = load_tokenizer("ids:50")
    assert tok.vocab_size == 50 and (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 0, 0)
    assert tok.encode("3 1 4  49\n0") == [3, 1, 4, 49, 0]
    assert tok.decode([3, 1, 4]) == "3 1 4"
    assert tok.spec() == "ids:50" and load_tokenizer(tok.spec()).identity() == tok.identity()
    other = load_tokenizer("ids:50:1:2:3")
    assert other.spec() == "ids:50:1:2:3" and other.identity()["sha256"] != tok.identity()["sha256"]
    built = TOKENIZER.build("ids", IdsTokenizer.Config(vocab_size=50))
    assert built.identity() == tok.identity()  # recipe section and CLI spec name the same tokenizer


@pytest.mark.parametrize("bad, message", [("3 x", "decimal token ids"), ("3 50", "outside 0..49")])
def test_ids_encode_errors(bad, message):
    with pytest.raises(DataError, match=message):
        load_tokenizer("ids:50").encode(bad)


def test_ids_config_errors():
    with pytest.raises(DataError, match="expected ids:V"):
        load_tokenizer("ids:fifty")
    with pytest.raises(DataError, match="bos_id=60 is not an id below vocab_size=50"):
        load_tokenizer("ids:50:60")
