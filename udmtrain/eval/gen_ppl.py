"""Generative perplexity of samples under an autoregressive judge, plus unigram entropy (and MAUVE).

The only module that imports ``transformers`` (lazily, for the judge). Protocol (docs/theory.md §7, App. A),
MDLM-style, every knob recorded in the returned JSON-able dict:

1. decode the diffusion samples to text (``decode_fn``, special tokens as the caller decides);
2. retokenise each text with the judge's tokenizer, optionally prefix the judge's EOS, truncate to
   the judge's context ``max_len``;
3. score ``nll_j = -log p_judge(s_j | s_<j)`` for every target position ``j >= 1`` of each sequence
   ``s_0..s_{n-1}`` (batched, right padding + attention mask; padding is never scored);
4. **first-EOS rule**: count target j iff ``s_j != eos`` or s_j is the first EOS of the sequence
   (position 0 included: a leading BOS=EOS makes every later EOS uncounted, as in MDLM);
5. corpus level: ``gen_ppl = exp( sum_counted nll / #counted )``. No sample is dropped (docs/theory.md §10.15:
   the last batch may be smaller).

Entropy: per sample, the unigram entropy ``H = -sum_v p_v log p_v`` (natural log) of the sample's
token ids in the *diffusion* tokenizer's id space, ``p_v`` = count / length; averaged over samples.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from udmtrain.utils.optional import require

DEFAULT_JUDGE = "gpt2-large"
FIRST_EOS_RULE = ("count every scored target token that is not EOS, plus the first EOS of the sequence "
                  "(position 0 included); padding never counted")


@runtime_checkable
class Judge(Protocol):
    """What ``gen_ppl_report`` needs from an autoregressive scorer.

    ``eos_id``: the judge's EOS id; ``max_len``: its context length (retokenised samples are cut to it).
    """

    eos_id: int
    max_len: int

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Judge token ids of each text (no truncation: the caller truncates to ``max_len``)."""

    def nll(self, token_batch: Sequence[Sequence[int]]) -> torch.Tensor:
        """Next-token NLL ``[B, Lmax - 1]`` (float): entry (b, j) = ``-log p(s_b[j+1] | s_b[:j+1])``;
        entries past a sequence's own length are ignored by the caller."""

    def identity(self) -> dict:
        """JSON-able description (name/path, class, dtype, vocab, versions) recorded in the report."""


def _transformers_dtype_kwarg(transformers) -> str:
    """``dtype=`` since transformers 4.56 (5.x warns on ``torch_dtype=``), ``torch_dtype=`` before."""
    major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown judge dtype {dtype!r}; use float32, bfloat16 or float16")
    return value


class HFJudge:
    """A Hugging Face causal LM + tokenizer as a ``Judge``.

    ``nll`` runs the model on right-padded batches with an attention mask and takes the next-token
    cross-entropy in float32 from the (possibly bf16) logits: ``-log softmax(logits[:, j])[s_{j+1}]``.
    """

    def __init__(self, model, tokenizer, *, name: str, source: str = "object", max_len: int | None = None,
                 add_special_tokens: bool = True) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name, self.source = name, source
        self.add_special_tokens = add_special_tokens
        if tokenizer.eos_token_id is None:
            raise ValueError(f"judge {name!r}: its tokenizer has no eos_token; the first-EOS rule needs one")
        self.eos_id = int(tokenizer.eos_token_id)
        self.pad_id = int(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else self.eos_id
        config = model.config
        context = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
        self.max_len = int(max_len or context or 1024)

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Judge ids of each text (``add_special_tokens`` as configured)."""
        out = self.tokenizer(list(texts), add_special_tokens=self.add_special_tokens)
        return [list(ids) for ids in out["input_ids"]]

    @torch.no_grad()
    def nll(self, token_batch: Sequence[Sequence[int]]) -> torch.Tensor:
        """Next-token NLL ``[B, Lmax - 1]`` float64 on the CPU (see ``Judge.nll``)."""
        device = next(self.model.parameters()).device
        lengths = [max(len(ids), 1) for ids in token_batch]  # an empty text still gets one pad token
        L = max(lengths)
        ids_BL = torch.full((len(token_batch), L), self.pad_id, dtype=torch.long)
        mask_BL = torch.zeros(len(token_batch), L, dtype=torch.long)
        for b, ids in enumerate(token_batch):
            ids_BL[b, :len(ids)] = torch.tensor(list(ids), dtype=torch.long)
            mask_BL[b, :lengths[b]] = 1
        if L < 2:
            return torch.zeros(len(token_batch), 0, dtype=torch.float64)
        ids_BL, mask_BL = ids_BL.to(device), mask_BL.to(device)
        logits_BLV = self.model(input_ids=ids_BL, attention_mask=mask_BL).logits
        nll_BL = torch.nn.functional.cross_entropy(logits_BLV[:, :-1].float().transpose(1, 2), ids_BL[:, 1:],
                                                   reduction="none")
        return nll_BL.double().cpu()

    def identity(self) -> dict:
        import transformers

        p = next(self.model.parameters())
        return {"kind": "huggingface", "name_or_path": self.name, "source": self.source,
                "class": type(self.model).__name__, "dtype": str(p.dtype).replace("torch.", ""),
                "device": str(p.device), "num_parameters": sum(q.numel() for q in self.model.parameters()),
                "vocab_size": int(self.model.config.vocab_size), "eos_id": self.eos_id, "pad_id": self.pad_id,
                "max_len": self.max_len, "add_special_tokens": self.add_special_tokens,
                "commit_hash": getattr(self.model.config, "_commit_hash", None),
                "transformers_version": transformers.__version__}


OFFLINE_JUDGE_HINT = "runs/quickstart-ar"
"""The AR run tools/quickstart.sh trains: the judge that always works offline."""


class JudgeUnavailable(FileNotFoundError):
    """The judge named on the command line cannot be loaded (missing directory, hub unreachable)."""


def hub_unreachable(timeout: float = 1.5) -> str:
    """Why the Hugging Face hub cannot be used right now ('' when it can): ``HF_HUB_OFFLINE`` /
    ``TRANSFORMERS_OFFLINE`` set, or no TCP connection to the hub's host within ``timeout`` seconds
    (name resolution included; a thread bounds it, since ``getaddrinfo`` itself has no timeout)."""
    import socket
    import threading
    from urllib.parse import urlparse

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{var} is set"
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    result: list[str] = []

    def probe() -> None:
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            result.append("")
        except OSError as err:
            result.append(f"{host} cannot be reached ({type(err).__name__})")

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return result[0] if result else f"{host} did not answer within {timeout:g} s"


def _looks_like_path(spec: str) -> bool:
    """A filesystem path rather than a hub id: explicit prefixes, or a parent directory that exists
    here (``runs/quickstart-ar`` when ``runs/`` exists; ``openai-community/gpt2`` is a hub id)."""
    parent = os.path.dirname(spec.rstrip(os.sep))
    return spec.startswith(("/", "./", "../", "~")) or bool(parent) and os.path.isdir(parent)


def _in_hf_cache(repo_id: str) -> bool:
    """True when the local Hugging Face cache holds ``repo_id``'s config.json (no network used)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # noqa: BLE001 - an invalid repo id is simply not cached
        return False


def load_judge(spec: Any = DEFAULT_JUDGE, device: str | torch.device = "cpu",
               dtype: torch.dtype | str = torch.float32, *, max_len: int | None = None,
               add_special_tokens: bool = True) -> Judge:
    """The judge named by ``spec``: a Hugging Face hub id (default ``gpt2-large``; needs network),
    a local directory holding a causal LM + tokenizer (``save_pretrained`` layout; offline), or an
    object that already implements ``Judge`` (returned as is)."""
    if not isinstance(spec, (str, os.PathLike)):
        if isinstance(spec, Judge):
            return spec
        missing = [m for m in ("eos_id", "max_len", "tokenize", "nll", "identity") if not hasattr(spec, m)]
        raise TypeError(f"judge object {type(spec).__name__} does not implement the Judge protocol "
                        f"(missing: {', '.join(missing)})")
    spec = os.fspath(spec)
    is_local = os.path.isdir(spec)
    if not is_local and _looks_like_path(spec):
        raise JudgeUnavailable(f"judge directory {spec!r} does not exist; give a udmtrain AR run (e.g. "
                               f"{OFFLINE_JUDGE_HINT}), a directory with a saved Hugging Face model, or a hub id")
    transformers = require("transformers", extra="eval", feature=f"the gen_ppl judge {spec!r}")
    kwargs = {_transformers_dtype_kwarg(transformers): _as_dtype(dtype)}
    if not is_local and not _in_hf_cache(spec):
        reason = hub_unreachable()
        if reason:
            raise JudgeUnavailable(f"gen_ppl judge {spec!r} is a Hugging Face hub id, but {reason} and it is not "
                                   f"in the local Hugging Face cache; pass a local judge: --judge "
                                   f"{OFFLINE_JUDGE_HINT} (a udmtrain AR run) or --judge DIR (a saved Hugging "
                                   "Face causal LM)")
    elif not is_local and hub_unreachable():
        kwargs["local_files_only"] = True  # cached: skip the hub's retries
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(spec, **{k: v for k, v in kwargs.items()
                                                                        if k == "local_files_only"})
        model = transformers.AutoModelForCausalLM.from_pretrained(spec, **kwargs)
    except OSError as err:
        where = "local directory" if is_local else "Hugging Face hub id"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise JudgeUnavailable(f"could not load the gen_ppl judge {spec!r} as a {where}: {first}; offline, pass "
                               f"--judge {OFFLINE_JUDGE_HINT} (a udmtrain AR run) or a directory written by "
                               "save_pretrained") from None
    return HFJudge(model.to(device), tokenizer, name=spec, source="local" if is_local else "hub",
                   max_len=max_len, add_special_tokens=add_special_tokens)


def first_eos_counted(ids: Sequence[int], eos_id: int) -> list[bool]:
    """For targets j = 1..n-1 of ``ids``: counted iff ``ids[j] != eos`` or j is the first EOS overall."""
    counted, seen_eos = [], len(ids) > 0 and ids[0] == eos_id
    for tok in ids[1:]:
        if tok != eos_id:
            counted.append(True)
        else:
            counted.append(not seen_eos)
            seen_eos = True
    return counted


def unigram_entropy(ids: Sequence[int]) -> float:
    """``-sum_v p_v log p_v`` (nats) of the empirical token distribution of one sample (0 if empty)."""
    n = len(ids)
    if n == 0:
        return 0.0
    return -sum(c / n * math.log(c / n) for c in Counter(ids).values())


def _as_lists(samples: Any) -> list[list[int]]:
    if isinstance(samples, torch.Tensor):
        if samples.dim() != 2:
            raise ValueError(f"samples must be a [N, L] token tensor, got shape {tuple(samples.shape)}")
        return samples.long().tolist()
    return [list(map(int, s.tolist() if isinstance(s, torch.Tensor) else s)) for s in samples]


def _mauve(texts: list[str], references: Sequence[str] | None, kwargs: Mapping[str, Any] | None) -> dict:
    if references is None:
        return {"status": "not requested"}
    if importlib.util.find_spec("mauve") is None:
        return {"status": "not installed", "hint": "pip install 'udmtrain[eval]' (mauve-text)"}
    import mauve

    settings = {"featurize_model_name": DEFAULT_JUDGE, "num_buckets": 25, "max_text_length": 1024,
                "device_id": 0 if torch.cuda.is_available() else -1, "verbose": False, "seed": 25}
    settings.update(kwargs or {})
    out = mauve.compute_mauve(p_text=list(references), q_text=texts, **settings)
    return {"status": "ok", "mauve": float(out.mauve), "num_references": len(references), **settings}


def gen_ppl_report(samples_token_ids: Any, decode_fn: Callable[[list[list[int]]], list[str]], judge: Judge, *,
                   batch_size: int = 8, prefix_eos: bool = False,
                   sampler_settings: Mapping[str, Any] | None = None, seeds: Any = None,
                   protocol: Mapping[str, Any] | None = None, mauve_references: Sequence[str] | None = None,
                   mauve_kwargs: Mapping[str, Any] | None = None, per_sample: bool = False,
                   on_progress: Callable[[int], None] | None = None) -> dict:
    """Corpus-level generative perplexity, entropy and (optionally) MAUVE of ``samples_token_ids``.

    ``samples_token_ids``: LongTensor ``[N, L]`` or a list of id lists in the diffusion tokenizer's
    space; ``decode_fn(list of id lists) -> list of texts``; ``judge``: a ``Judge`` (``load_judge``).
    ``gen_ppl = exp(sum_counted NLL / #counted)`` with the first-EOS rule (module docstring).
    ``sampler_settings``, ``seeds`` and ``protocol`` are recorded verbatim. With ``per_sample`` the
    per-sample NLL sum, counted tokens and entropy are included. ``on_progress(n)`` is called after
    each judge batch with the number of samples it scored.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    samples = _as_lists(samples_token_ids)
    if not samples:
        raise ValueError("gen_ppl_report got no samples")
    texts = list(decode_fn(samples))
    if len(texts) != len(samples):
        raise ValueError(f"decode_fn returned {len(texts)} texts for {len(samples)} samples")
    judge_ids = judge.tokenize(texts)
    if prefix_eos:
        judge_ids = [[judge.eos_id] + ids for ids in judge_ids]
    num_truncated = sum(len(ids) > judge.max_len for ids in judge_ids)
    judge_ids = [ids[:judge.max_len] for ids in judge_ids]
    sums, counts = [], []
    for start in range(0, len(judge_ids), batch_size):  # last batch may be smaller: nothing dropped
        chunk = judge_ids[start:start + batch_size]
        nll_BJ = judge.nll(chunk)
        for b, ids in enumerate(chunk):
            mask_J = torch.tensor(first_eos_counted(ids, judge.eos_id), dtype=torch.bool)
            values_J = nll_BJ[b, :len(mask_J)].double()
            if bool((~torch.isfinite(values_J[mask_J])).any()):
                raise FloatingPointError(f"the judge returned a non-finite NLL for sample {start + b}")
            sums.append(float(values_J[mask_J].sum()))
            counts.append(int(mask_J.sum()))
        if on_progress is not None:
            on_progress(len(chunk))
    total_nll, total_counted = math.fsum(sums), sum(counts)
    gen_nll = total_nll / total_counted if total_counted else float("nan")
    entropies = [unigram_entropy(s) for s in samples]
    mean_h = sum(entropies) / len(entropies)
    std_h = math.sqrt(sum((h - mean_h) ** 2 for h in entropies) / max(len(entropies) - 1, 1))
    report = {
        "gen_ppl": math.exp(gen_nll) if total_counted else float("nan"),
        "gen_nll": gen_nll,
        "entropy": mean_h,
        "entropy_std": std_h,
        "num_samples": len(samples),
        "num_samples_dropped": 0,
        "sample_lengths": sorted(set(len(s) for s in samples)),
        "num_tokens_scored": total_counted,
        "num_judge_tokens": sum(len(ids) for ids in judge_ids),
        "num_truncated": num_truncated,
        "notes": {"num_truncated": f"samples whose judge tokenization was longer than judge_max_len "
                                   f"({judge.max_len}) and was cut to it; only the first judge_max_len "
                                   "tokens of those are scored",
                  "num_samples_dropped": "always 0: every sample is scored (the last judge batch may be "
                                         "smaller)"},
        "judge": judge.identity(),
        "judge_batch_size": batch_size,
        "judge_max_len": judge.max_len,
        "retokenization": "decode_fn -> judge.tokenize" + (" -> prefix judge EOS" if prefix_eos else "")
                          + f" -> truncate to {judge.max_len}",
        "prefix_eos": prefix_eos,
        "token_accounting": "first_eos: " + FIRST_EOS_RULE,
        "aggregation": "corpus-level exp(sum NLL / sum counted tokens)",
        "entropy_definition": "per-sample unigram entropy (nats) in the diffusion tokenizer's id space, "
                              "mean over samples",
        "mauve": _mauve(texts, mauve_references, mauve_kwargs),
        "sampler": dict(sampler_settings) if sampler_settings is not None else None,
        "seeds": seeds,
    }
    if per_sample:
        report["per_sample"] = [{"nll_sum": s, "num_counted": c, "entropy": h}
                                for s, c, h in zip(sums, counts, entropies)]
    if protocol:
        report.update(protocol)
    return report
