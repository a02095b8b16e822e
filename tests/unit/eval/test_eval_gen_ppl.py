"""eval/gen_ppl.py: gen PPL against a hand computation with a tiny random GPT-2 judge (offline)."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402

from udmtrain.eval.gen_ppl import (  # noqa: E402
    HFJudge, _transformers_dtype_kwarg, first_eos_counted, gen_ppl_report, load_judge, unigram_entropy,
)

EOS = "<|endoftext|>"
JUDGE_WORDS = [EOS, "the", "cat", "sat", "on", "mat", "a", "dog", "ran", "far", "[UNK]"]
# The diffusion model's own id space: a different order (entropy must be computed here, not in the judge's).
DIFF_WORDS = ["dog", "ran", EOS, "far", "the", "cat", "sat", "on", "mat", "a"]


def decode(samples):
    return [" ".join(DIFF_WORDS[i] for i in s) for s in samples]


def diff_ids(text):
    return [DIFF_WORDS.index(w) for w in text.split()]


@pytest.fixture(scope="module")
def judge_parts():
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(JUDGE_WORDS)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=EOS, unk_token="[UNK]")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=len(JUDGE_WORDS), n_positions=32, n_layer=2, n_head=2, n_embd=32,
                                  bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg).double().eval()
    return model, tok


SAMPLES = [
    diff_ids(f"{EOS} the cat sat on the mat {EOS} a dog"),       # leading BOS=EOS: the later EOS not counted
    diff_ids(f"the cat {EOS} {EOS} ran far"),                     # first EOS counted, second not
    diff_ids("a dog ran far the cat sat on the mat a dog ran"),   # 13 words > max_len 9: truncated
    diff_ids("dog"),                                              # nothing to score
    diff_ids(f"the {EOS} dog ran"),
]


def hand_gen_ppl(model, tok, max_len, prefix_eos=False):
    """Unbatched forward + log_softmax per sample; first-EOS rule applied by hand."""
    total, count = 0.0, 0
    for text in decode(SAMPLES):
        ids = tok(text)["input_ids"]
        ids = ([0] if prefix_eos else []) + ids
        ids = ids[:max_len]
        if len(ids) < 2:
            continue
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
        eos_positions = [j for j, v in enumerate(ids) if v == 0]
        first_eos = eos_positions[0] if eos_positions else None
        for j in range(1, len(ids)):
            if ids[j] != 0 or j == first_eos:
                total += -float(logp[j - 1, ids[j]])
                count += 1
    return math.exp(total / count), count


@pytest.mark.parametrize("prefix_eos", [False, True])
def test_gen_ppl_matches_hand_computation(judge_parts, prefix_eos):
    model, tok = judge_parts
    judge = HFJudge(model, tok, name="tiny-gpt2", max_len=9)
    report = gen_ppl_report(SAMPLES, decode, judge, batch_size=2, prefix_eos=prefix_eos,
                            sampler_settings={"name": "ancestral", "steps": 16, "temperature": 1.0},
                            seeds=[3], protocol={"checkpoint": "step_10"}, per_sample=True)
    expected, count = hand_gen_ppl(model, tok, 9, prefix_eos)
    assert report["gen_ppl"] == pytest.approx(expected, rel=1e-6)
    assert report["num_tokens_scored"] == count
    assert report["num_samples"] == 5 and report["num_samples_dropped"] == 0  # 5 = 2 + 2 + 1: none dropped
    assert report["num_truncated"] == 2  # samples 0 (10 words) and 2 (13 words) exceed 9
    assert report["judge"]["name_or_path"] == "tiny-gpt2" and report["judge"]["dtype"] == "float64"
    assert report["sampler"]["steps"] == 16 and report["seeds"] == [3] and report["checkpoint"] == "step_10"
    assert report["token_accounting"].startswith("first_eos")
    json.dumps(report)  # JSON-able


def test_first_eos_rule_counts_by_hand():
    assert first_eos_counted([0, 5, 0, 6], eos_id=0) == [True, False, True]   # leading EOS is the first
    assert first_eos_counted([5, 0, 0, 6, 0], eos_id=0) == [True, False, True, False]
    assert first_eos_counted([5], eos_id=0) == [] and first_eos_counted([], eos_id=0) == []


def test_entropy_in_diffusion_id_space_by_hand(judge_parts):
    model, tok = judge_parts
    samples = [[1, 1, 2, 3], [4, 4, 4, 4]]
    h0 = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    assert unigram_entropy(samples[0]) == pytest.approx(h0, abs=1e-15)
    assert unigram_entropy(samples[1]) == 0.0
    report = gen_ppl_report(torch.tensor(samples), decode, HFJudge(model, tok, name="t"), batch_size=8)
    assert report["entropy"] == pytest.approx(h0 / 2, abs=1e-15)
    assert report["entropy_std"] == pytest.approx(math.sqrt(2 * (h0 / 2) ** 2), abs=1e-12)


def test_load_judge_from_local_directory_and_objects(judge_parts, tmp_path):
    model, tok = judge_parts
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    judge = load_judge(str(tmp_path), device="cpu", dtype="float64", max_len=9)
    assert judge.identity()["source"] == "local" and judge.eos_id == 0 and judge.max_len == 9
    a = gen_ppl_report(SAMPLES, decode, judge, batch_size=3)
    b = gen_ppl_report(SAMPLES, decode, HFJudge(model, tok, name="x", max_len=9), batch_size=1)
    assert a["gen_ppl"] == pytest.approx(b["gen_ppl"], rel=1e-9)  # batch size / padding independent
    assert load_judge(judge) is judge
    with pytest.raises(TypeError, match="missing: eos_id, max_len, tokenize, nll, identity"):
        load_judge(object())
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_judge(str(tmp_path / "nope"))


def test_mauve_status_and_errors(judge_parts):
    model, tok = judge_parts
    judge = HFJudge(model, tok, name="t")
    report = gen_ppl_report(SAMPLES[:2], decode, judge, mauve_references=["the cat sat"])
    if importlib.util.find_spec("mauve") is None:
        assert report["mauve"]["status"] == "not installed"
    assert gen_ppl_report(SAMPLES[:1], decode, judge)["mauve"] == {"status": "not requested"}
    with pytest.raises(ValueError, match="decode_fn returned 1 texts for 2 samples"):
        gen_ppl_report(SAMPLES[:2], lambda s: ["x"], judge)


def test_dtype_keyword_follows_the_transformers_version():
    from types import SimpleNamespace

    assert _transformers_dtype_kwarg(SimpleNamespace(__version__="4.41.2")) == "torch_dtype"
    assert _transformers_dtype_kwarg(SimpleNamespace(__version__="4.57.6")) == "dtype"
    assert _transformers_dtype_kwarg(SimpleNamespace(__version__="5.24.0")) == "dtype"


def test_progress_callback_and_notes(judge_parts):
    model, tok = judge_parts
    seen = []
    report = gen_ppl_report(SAMPLES, decode, HFJudge(model, tok, name="t", max_len=9), batch_size=2,
                            on_progress=seen.append)
    assert seen == [2, 2, 1]  # samples scored per judge batch
    assert "longer than judge_max_len (9)" in report["notes"]["num_truncated"]


def test_offline_hub_judge_fails_fast_in_one_line(monkeypatch):
    import time

    from udmtrain.eval.gen_ppl import JudgeUnavailable, hub_unreachable

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_unreachable() == "HF_HUB_OFFLINE is set"
    t0 = time.perf_counter()
    with pytest.raises(JudgeUnavailable) as err:
        load_judge("udmtrain-test/no-such-judge")
    assert time.perf_counter() - t0 < 5
    message = str(err.value)
    assert "\n" not in message and "--judge runs/quickstart-ar" in message and "HF_HUB_OFFLINE is set" in message
    # no offline switch, but the hub's host refuses connections: the socket probe says so within its timeout
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://127.0.0.1")
    reason = hub_unreachable(timeout=1.0)
    assert reason.startswith("127.0.0.1 cannot be reached") or "did not answer" in reason


def test_a_missing_local_judge_path_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    from udmtrain.eval.gen_ppl import JudgeUnavailable

    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)  # runs/ exists here, so runs/quickstart-ar is a path, not a hub id
    with pytest.raises(JudgeUnavailable, match="judge directory 'runs/quickstart-ar' does not exist"):
        load_judge("runs/quickstart-ar")
