"""``data.document_attention=true`` end to end: 2 real training steps of ``launch/pretrain.py`` (diffusion
and AR) with the shards' document ids reaching the model, and a finite validation NLL at step 2."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

import train_helpers as th

EVAL_BATCHES = 70
"""Validation batches (of engine.micro_batch_size=2) evaluated at step 2: the demo documents are long
(~2,600 tokens), so with seq_len 32 only ~1% of sequences span two documents; the first ones are in
validation batch 67 (checked by the first test)."""
SEED = 9
"""A ``run.seed`` whose first training step has a row spanning two documents (checked by the first test)."""
FAST_LR = ("optim.lr=0.05", "lr_schedule.warmup_steps=0")
DOC_RUN = ("train.max_steps=2", "eval.every=2", f"eval.num_batches={EVAL_BATCHES}", "train.ema_decay=0")


def _run(tiny_data: Path, runs_root: Path, recipe: str, name: str, *extra: str) -> Path:
    overrides = th.tiny_overrides(tiny_data, runs_root, name, *DOC_RUN, *extra, dit=recipe == "quickstart.yaml")
    proc = th.run(th.REPO / "recipes" / recipe, overrides)
    run_dir = runs_root / name
    th.check_ok(proc, run_dir, 2)
    return run_dir


def _check_finite(run_dir: Path) -> tuple[dict[int, float], float]:
    """``({step: train/loss}, val/nll)`` of a finished 2-step run, all finite."""
    losses = th.losses(run_dir)
    assert sorted(losses) == [1, 2] and all(math.isfinite(v) for v in losses.values()), losses
    val = [r["val/nll"] for r in th.metrics(run_dir) if "val/nll" in r]
    assert len(val) == 1 and math.isfinite(val[0]) and val[0] > 0, th.metrics(run_dir)
    return losses, val[0]


def _docs_per_row(batches, count: int) -> list[int]:
    """Distinct documents in each row of the first ``count`` batches."""
    return [len(set(row[row >= 0].tolist())) for _, batch in zip(range(count), batches) for row in batch["doc_ids"]]


def test_tiny_shards_pack_several_documents_per_sequence(tiny_data):
    """Rows spanning two documents exist among the evaluated validation batches and in step 1 of the
    training stream under ``run.seed=SEED``: otherwise the document mask would be the full mask and the
    comparison below would prove nothing."""
    from udmtrain.config import load_recipe
    from udmtrain.data.loader import build_train_loader, build_valid_loader

    cfg = load_recipe(str(th.REPO / "recipes" / "quickstart_ar.yaml"), th.tiny_overrides(
        tiny_data, tiny_data, "probe", "data.document_attention=true", dit=False))
    assert cfg.data.document_attention is True
    valid = _docs_per_row(build_valid_loader(cfg.data, 2, 0, 1), EVAL_BATCHES)
    assert len(valid) == 2 * EVAL_BATCHES and max(valid) >= 2
    loader = build_train_loader(cfg.data, 2, 0, 1, SEED)
    try:
        step1 = _docs_per_row(loader, 2)  # global batch 4 = 2 micro-batches of 2
    finally:
        loader.close()
    assert max(step1) >= 2, f"no row of step 1 spans two documents with run.seed={SEED} ({step1}); pick another SEED"


def test_diffusion_document_attention_changes_only_the_evaluation(tiny_data, runs_root):
    """AUDM quickstart (DiT), default seed: no row of the first 2 training steps spans two documents, so
    training is identical with the mask on and off, and the validation NELBO differs only through the
    evaluation path (``Evaluator`` -> ``estimate_nelbo(batch_kwargs)`` -> ``nelbo_fn``). The DiT's head is still small after
    2 steps, so the difference is small (~3e-6 nats), but far above fp32 rounding of a mean over
    ~4,500 tokens (~1e-8)."""
    runs = [_check_finite(_run(tiny_data, runs_root, "quickstart.yaml", f"docattn_audm_{on}",
                               f"data.document_attention={on}", *FAST_LR)) for on in ("true", "false")]
    (on_loss, on_val), (off_loss, off_val) = runs
    assert on_loss == off_loss, (on_loss, off_loss)
    assert abs(on_val - off_val) > 1e-6, (on_val, off_val)


def test_document_attention_changes_training_and_evaluation(tiny_data, runs_root):
    """Same seed and data with the mask off (AR baseline): step 1's loss is equal (the zero-initialised
    head predicts uniformly either way), step 2's differs (step 1 had a row spanning two documents, so
    its gradients differ) and so does the validation NLL: the ids reached the network in training and
    in evaluation. A large learning rate moves the head enough in 2 steps for the differences to
    stand far above rounding."""
    runs = []
    for name, on in (("docattn_ar_on", "true"), ("docattn_ar_off", "false")):
        run_dir = _run(tiny_data, runs_root, "quickstart_ar.yaml", name, f"data.document_attention={on}",
                       f"run.seed={SEED}", *FAST_LR)
        runs.append(_check_finite(run_dir))
    (on_loss, on_val), (off_loss, off_val) = runs
    assert on_loss[1] == pytest.approx(off_loss[1], rel=1e-9), (on_loss, off_loss)
    assert abs(on_loss[2] - off_loss[2]) > 1e-4, (on_loss, off_loss)
    assert abs(on_val - off_val) > 1e-4, (on_val, off_val)
