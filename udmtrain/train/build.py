"""Wiring: the only module that knows every component family (docs/design.md C4, C12).

``build_components(cfg, vocab_size)`` turns a validated ``RunConfig`` into the pure-torch pieces
(process, schedule, parameterization, loss, objective, model, sampler) with no distributed state;
``build_trainer(cfg)`` adds the engine, data, checkpoints, logging and evaluation around them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from udmtrain.train.components import (  # noqa: F401 (re-exported: the public build API)
    Components, NetworkCall, autocast_context, build_components, build_sampler, resolve_vocab_size)
from udmtrain.train.evaluate import Evaluator, ar_nll_fn, ema_weights, nelbo_fn  # noqa: F401
from udmtrain.train.step import TrainStep, make_skippable, skip_with_optimizer
from udmtrain.utils.dist import print0

__all__ = [  # the public build API (tools and tests import these from here)
    "Components", "Evaluator", "NetworkCall", "Run", "TrainStep", "ar_nll_fn", "autocast_context",
    "build_components", "build_sampler", "build_trainer", "ema_weights", "make_skippable", "nelbo_fn",
    "resolve_vocab_size", "run_dir_for", "run_identity", "skip_with_optimizer",
]


def run_identity(cfg: Any, manifest: Any | None = None) -> dict[str, Any]:
    """What a checkpoint records of the run's vocabulary (``checkpoint.RUN_IDENTITY``): V and the sha256 of
    the tokenizer's files, from the shards' manifest (which the launch checked against the recipe's
    tokenizer) or else from loading the tokenizer; ``{}`` when neither is available here."""
    if manifest is not None:
        return {"vocab_size": int(manifest.vocab_size), "tokenizer_sha256": manifest.tokenizer.get("sha256")}
    from udmtrain.data.errors import DataError
    from udmtrain.data.tokenizers import load_tokenizer

    try:
        identity = load_tokenizer(cfg.tokenizer).identity()
    except (DataError, OSError, ValueError):
        return {}
    return {"vocab_size": int(identity["vocab_size"]), "tokenizer_sha256": identity.get("sha256")}


def run_dir_for(cfg: Any) -> Path:
    """``<run.output_root>/<run.name>``."""
    return Path(cfg.run.output_root) / cfg.run.name


@dataclass
class Run:
    """A built training run: call ``trainer.train()`` then ``close()``."""

    trainer: Any
    close: Callable[[], None]
    run_dir: Path


def build_trainer(cfg: Any) -> Run:
    """Initialise the process group and wire data, components, engine, EMA, checkpoints and logging.

    Order matters for exact resume: the model is initialised from ``run.seed`` identically on every
    rank, the checkpoint (weights, optimizer, LR schedule, data cursor, EMA, RNG states) is loaded
    last, and nothing random is drawn between the load and the first step.
    """
    from udmtrain.data.loader import build_train_loader
    from udmtrain.data.manifest import check_manifest
    from udmtrain.engine import deepspeed_engine as dse
    from udmtrain.engine.optim import apply_hyperparameters, build_lr_schedule, build_optimizer
    from udmtrain.models.ema import EMA
    from udmtrain.models.flops import flops_per_token
    from udmtrain.train.checkpoint import Checkpointer
    from udmtrain.train.metrics import MetricLogger, StepTimer, measure_peak_flops, slow_bf16_note
    from udmtrain.train.signals import GracefulExit
    from udmtrain.config.loader import dump_yaml
    from udmtrain.train.state import TrainState
    from udmtrain.train.text_samples import build_text_samples, flat_hparams
    from udmtrain.train.trainer import TrainCheckpointer, Trainer
    from udmtrain.utils.dist import broadcast_object
    from udmtrain.utils.io import OutputError, lock_directory

    rank, world, device = dse.init_distributed()
    # one run per run directory: rank 0 holds its lock until close(); every rank learns a refusal
    lock, refusal = None, None
    if rank == 0:
        try:
            lock = lock_directory(run_dir_for(cfg))
        except OutputError as err:
            refusal = str(err)
    refusal = broadcast_object(refusal, src=0)
    if refusal is not None:
        raise OutputError(refusal)
    manifest = check_manifest(cfg.data, expected_tokenizer=cfg.tokenizer)
    torch.manual_seed(cfg.run.seed)
    vocab_size = resolve_vocab_size(cfg, manifest)
    identity = run_identity(cfg, manifest)  # checked on resume, recorded in every checkpoint
    components = build_components(cfg, vocab_size, with_sampler=False)
    # counted before deepspeed.initialize: ZeRO-3 empties the partitioned weights (numel 0)
    flops = flops_per_token(components.model, cfg.data.seq_len)
    run_dir = run_dir_for(cfg)
    recipe_dict = cfg.to_dict()
    created: list[torch.optim.Optimizer] = []
    builder = build_optimizer(cfg.optim.name, cfg.optim.cfg, device=device)

    def make_optimizer(params):
        created.append(make_skippable(builder(params)))
        return created[-1]

    schedule = build_lr_schedule(cfg.lr_schedule.name, cfg.lr_schedule.cfg, cfg.train.max_steps)

    def make_lr_schedule(optimizer):
        return skip_with_optimizer(schedule(optimizer), optimizer)

    engine = dse.create_engine(components.model, make_optimizer, make_lr_schedule,
                               dse.build_ds_config(cfg.engine, world), compile=cfg.engine.compile)
    ema = None
    if cfg.train.ema_decay > 0:
        with dse.gathered_parameters(engine.module):
            ema = EMA(engine.module, decay=cfg.train.ema_decay)
    # measured before the checkpoint restores the RNG states (it uses a private generator anyway)
    peak = measure_peak_flops(device, torch.bfloat16 if cfg.engine.precision == "bf16" else torch.float32)
    if cfg.engine.precision == "bf16" and device.type == "cpu":
        note = slow_bf16_note(peak, measure_peak_flops(device, torch.float32))
        if note:
            print0(note)
    state = TrainState()
    checkpointer = Checkpointer(run_dir, cfg.checkpoint.every, cfg.checkpoint.keep_last, cfg.checkpoint.resume)
    train_loader = build_train_loader(cfg.data, cfg.engine.micro_batch_size, rank, world, cfg.run.seed)
    resume_dir = checkpointer.find_resume()
    if resume_dir is not None:
        print0(f"resuming from {resume_dir}")
        checkpointer.load(engine, resume_dir, state, recipe_dict, identity)
        apply_hyperparameters(created[0], cfg.optim.cfg)  # the current recipe's optim.* win on resume
        if state.data_cursor:  # empty for an imported checkpoint (tools/import_ckpt.py): the stream starts afresh
            train_loader.load_state_dict(state.data_cursor)
        if ema is not None and state.ema is not None:
            ema.load_state_dict(state.ema)
    batches = iter(train_loader)
    metrics = MetricLogger(run_dir, rank, cfg.train.log_every, cfg.train.max_steps)
    timer = StepTimer()
    step_fn = TrainStep(engine=engine, objective=components.objective, components=components, cfg=cfg,
                        rank=rank, world_size=world, device=device, timer=timer, optimizer=created[0], ema=ema)
    evaluator = Evaluator(cfg=cfg, components=components, engine=engine, ema=ema, rank=rank,
                          world_size=world, device=device,
                          text_samples=build_text_samples(cfg, components, metrics.log_text, rank, device))
    metrics.log_run_start(dump_yaml(recipe_dict), flat_hparams(recipe_dict), state.step)

    def throughput(seconds: float, tokens: int) -> dict:
        tokens_per_s = tokens / max(seconds, 1e-9)
        return {"perf/tokens_per_s": tokens_per_s, "perf/step_s": seconds,
                "perf/mfu": flops * tokens_per_s / (peak * world)}

    signals = GracefulExit().__enter__()
    trainer = Trainer(
        state=state, max_steps=cfg.train.max_steps, max_nonfinite_steps=cfg.train.max_nonfinite_steps,
        batches=batches, step_fn=step_fn, metrics=metrics, evaluator=evaluator,
        checkpointer=TrainCheckpointer(checkpointer, engine, state, train_loader, ema, recipe_dict,
                                       {"run_name": cfg.run.name, **identity}),
        signals=signals, timer=timer, throughput=throughput, exact_nll=not components.is_diffusion)

    def close() -> None:
        signals.__exit__(None, None, None)
        metrics.close()
        close_loader = getattr(train_loader, "close", None)
        if close_loader is not None:
            close_loader()
        dse.teardown()
        if lock is not None:
            lock.close()  # releases the run directory

    print0(f"udmtrain: run {cfg.run.name} -> {run_dir} | world {world} on {device} | "
           f"{sum(getattr(p, 'ds_numel', p.numel()) for p in engine.module.parameters()):,} parameters | "
           f"resume from {resume_dir or 'scratch'} at step {state.step}")
    return Run(trainer=trainer, close=close, run_dir=run_dir)
