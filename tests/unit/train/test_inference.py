"""Checkpoint loading for inference: path resolution, EMA vs raw weights, fp32 merge of ZeRO shards.

Real DeepSpeed engines (gloo, CPU, one in-process rank), a real Checkpointer save and a tiny
sentencepiece tokenizer trained in tmp; nothing is mocked.
"""

import json
from pathlib import Path

import pytest
import torch

from udmtrain.engine import deepspeed_engine as dse
from udmtrain.train.inference import CheckpointNotFound, InferenceError, load_for_inference, resolve_checkpoint

REPO = Path(__file__).resolve().parents[3]


def _fake_step(ckpt_dir: Path, step: int) -> Path:
    d = ckpt_dir / f"step_{step:010d}"
    (d / "ds").mkdir(parents=True)
    (d / "meta.json").write_text(json.dumps({"step": step}))
    return d


def test_resolve_checkpoint_cases(tmp_path):
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    s2, s4 = _fake_step(ckpts, 2), _fake_step(ckpts, 4)
    (ckpts / "step_0000000006.tmp-123").mkdir()  # an unfinished save is never chosen
    (ckpts / "latest").write_text("step_0000000002\n")
    assert resolve_checkpoint(run) == s2  # through latest, even when a newer complete step exists
    assert resolve_checkpoint(ckpts) == s2
    assert resolve_checkpoint(s4) == s4
    (ckpts / "latest").unlink()
    assert resolve_checkpoint(run) == s4  # no latest: the newest complete step
    with pytest.raises(CheckpointNotFound, match="does not exist"):
        resolve_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointNotFound, match="is not a udmtrain run directory"):
        resolve_checkpoint(tmp_path)
    with pytest.raises(CheckpointNotFound, match="is not a udmtrain run directory"):
        resolve_checkpoint(ckpts / "step_0000000006.tmp-123")


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    from udmtrain.data.tokenizers import train_sentencepiece

    out = tmp_path_factory.mktemp("tok") / "tok.model"
    text = "the quick brown fox jumps over the lazy dog. " * 50 + "abcdefghijklmnopqrstuvwxyz 0123456789 ,.;:!?"
    docs = [text[i:] + "\n" + text[:i] for i in range(0, 400, 7)]
    train_sentencepiece(iter(docs), str(out), vocab_size=384)
    return str(out)


def _save_trained_checkpoint(run_dir: Path, tokenizer_path: str, stage: int, precision: str, ema_decay: float):
    """Two real optimizer steps of a tiny AUDM DiT through DeepSpeed, then a Checkpointer save."""
    from udmtrain.config import load_recipe
    from udmtrain.data.tokenizers import load_tokenizer
    from udmtrain.engine.optim import build_lr_schedule, build_optimizer
    from udmtrain.models.ema import EMA
    from udmtrain.train.build import NetworkCall, build_components
    from udmtrain.train.checkpoint import Checkpointer
    from udmtrain.train.state import TrainState

    cfg = load_recipe(str(REPO / "recipes" / "quickstart.yaml"), [
        f"tokenizer.path={tokenizer_path}", "data.seq_len=16", "model.hidden_size=32", "model.num_blocks=1",
        "model.num_heads=2", "model.cond_dim=16", "engine.micro_batch_size=2", "engine.global_batch_size=2",
        f"engine.zero_stage={stage}", f"engine.precision={precision}", f"train.ema_decay={ema_decay}",
        f"run.output_root={run_dir.parent}", f"run.name={run_dir.name}"])
    V = load_tokenizer(cfg.tokenizer).vocab_size
    torch.manual_seed(0)
    comps = build_components(cfg, V, with_sampler=False)
    engine = dse.create_engine(comps.model, build_optimizer("adamw", cfg.optim.cfg),
                               build_lr_schedule(cfg.lr_schedule.name, cfg.lr_schedule.cfg, 10),
                               dse.build_ds_config(cfg.engine, 1))
    with dse.gathered_parameters(engine.module):
        ema = EMA(engine.module, decay=cfg.train.ema_decay) if ema_decay > 0 else None
    network = NetworkCall(engine, precision, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        x0 = torch.randint(0, V, (2, 16), generator=gen)
        out = comps.objective(network, x0, torch.ones_like(x0, dtype=torch.bool), torch.tensor([0.3, 0.8]), gen)
        engine.backward(out.loss)
        dse.step(engine)
        if ema is not None:
            with dse.gathered_parameters(engine.module):
                ema.update(engine.module)
    state = TrainState(step=2, ema=ema.state_dict() if ema is not None else None)
    step_dir = Checkpointer(run_dir, 1, 0).save(engine, 2, state, cfg.to_dict(), {"run_name": run_dir.name,
                                                                                   "vocab_size": V})
    return engine, ema, step_dir


@pytest.mark.parametrize("stage,precision", [(1, "fp32"), (3, "fp32"), (1, "bf16")])
def test_raw_and_ema_weights_round_trip(dist_group, tmp_path, tokenizer_path, stage, precision):
    engine, ema, step_dir = _save_trained_checkpoint(tmp_path / "run", tokenizer_path, stage, precision, 0.9)
    live = dse.full_state_dict(engine.module)  # gathered on every rank (ZeRO-3 too)
    merged = dse.load_fp32_state_dict(step_dir)
    assert set(merged) == set(live)
    for name, value in merged.items():
        assert value.dtype == torch.float32
        if precision == "fp32":
            assert torch.equal(value, live[name]), name  # the live fp32 params, bit for bit
        else:  # the fp32 masters: rounding them gives the live bf16 weights exactly
            assert torch.equal(value.to(torch.bfloat16).float(), live[name]), name

    raw = load_for_inference(tmp_path / "run", use_ema=False)
    with_ema = load_for_inference(tmp_path / "run")
    saved_shadow = torch.load(step_dir / "rank0_state.pt", weights_only=False)["ema"]["shadow"]
    raw_sd, ema_sd = raw.model.state_dict(), with_ema.model.state_dict()
    assert not raw.model.training and not with_ema.model.training
    assert with_ema.step == 2 and with_ema.use_ema and not raw.use_ema
    assert any(not torch.equal(raw_sd[k], ema_sd[k]) for k in raw_sd)  # EMA differs from the raw weights
    for name in saved_shadow:
        assert torch.equal(ema_sd[name], saved_shadow[name]), name
        assert torch.equal(ema_sd[name], ema.shadow[name]), name
        assert torch.equal(raw_sd[name], merged[name]), name


def test_missing_ema_says_no_ema(dist_group, tmp_path, tokenizer_path):
    _save_trained_checkpoint(tmp_path / "run", tokenizer_path, 1, "fp32", 0.0)
    with pytest.raises(InferenceError, match="--no-ema"):
        load_for_inference(tmp_path / "run")
    assert load_for_inference(tmp_path / "run", use_ema=False).components.is_diffusion
