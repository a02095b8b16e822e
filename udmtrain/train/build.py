"""Wiring: the only module that knows every component family (DESIGN C4, C12).

``build_components(cfg, vocab_size)`` turns a validated ``RunConfig`` into the pure-torch pieces
(process, schedule, parameterization, loss, objective, model, sampler) with no distributed state;
``build_trainer(cfg)`` adds the engine, data, checkpoints, logging and evaluation around them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from udmtrain.registry import LOSS, MODEL, PARAMETERIZATION, PROCESS, SAMPLER, SCHEDULE
from udmtrain.utils.dist import print0


@dataclass
class Components:
    """The math and the network of a run; ``process`` is None for the AR baseline."""

    model: torch.nn.Module
    objective: Any
    process: Any = None
    schedule: Any = None
    parameterization: Any = None
    loss: Any = None
    sampler: Any = None

    @property
    def is_diffusion(self) -> bool:
        return self.process is not None


def build_components(cfg: Any, vocab_size: int, *, with_sampler: bool = True) -> Components:
    """Instantiate every registered component named by ``cfg`` for a tokenizer of ``vocab_size``.

    The network's width is the process's token space (``process.num_states``: V for the uniform and
    absorbing-uniform processes, V + 1 for the masked one, SPEC 10.5).
    """
    from udmtrain.diffusion.objective import ARObjective, DiffusionObjective

    if cfg.process is None:
        model = MODEL.build(cfg.model.name, cfg.model.cfg, vocab_size=vocab_size)
        loss = LOSS.build(cfg.loss.name, cfg.loss.cfg)
        return Components(model=model, objective=ARObjective(loss), loss=loss)
    process = PROCESS.build(cfg.process.name, cfg.process.cfg, vocab_size=vocab_size)
    schedule = SCHEDULE.build(cfg.schedule.name, cfg.schedule.cfg)
    param = PARAMETERIZATION.build(cfg.parameterization.name, cfg.parameterization.cfg, process=process)
    loss = LOSS.build(cfg.loss.name, cfg.loss.cfg, process=process)
    model = MODEL.build(cfg.model.name, cfg.model.cfg, vocab_size=process.num_states,
                        uses_noise_tokens=process.uses_noise_tokens)
    sampler = None
    if with_sampler and cfg.sampler is not None:
        sampler = build_sampler(cfg.sampler.name, cfg.sampler.cfg, cfg.model.cfg, schedule, process, param)
    objective = DiffusionObjective(schedule, process, param, loss)
    return Components(model=model, objective=objective, process=process, schedule=schedule,
                      parameterization=param, loss=loss, sampler=sampler)


def build_sampler(name: str, sampler_cfg: Any, model_cfg: Any, schedule: Any, process: Any, param: Any) -> Any:
    """The sampler ``name``; its ``time_conditioned`` flag follows the model's ``time_conditioning``.

    The masked sampler's prediction cache is exact only for a network that ignores time (SPEC
    10.17), so a time-conditioned network silently using it would be wrong: the flag is taken
    from the model rather than trusted from a second, separately edited field.
    """
    if hasattr(sampler_cfg, "time_conditioned") and hasattr(model_cfg, "time_conditioning"):
        sampler_cfg = dataclasses.replace(sampler_cfg, time_conditioned=bool(model_cfg.time_conditioning))
    return SAMPLER.build(name, sampler_cfg, schedule=schedule, process=process, parameterization=param)


def autocast_context(precision: str, device: torch.device):
    """bf16 autocast for ``precision: bf16`` (on CPU too: ~4x faster matmuls), else a no-op."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if precision == "fp16" and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def resolve_vocab_size(cfg: Any, manifest: Any | None) -> int:
    """V from the shards' manifest when present, else from loading the recipe's tokenizer."""
    if manifest is not None:
        return int(manifest.vocab_size)
    from udmtrain.data.tokenizers import load_tokenizer

    return int(load_tokenizer(cfg.tokenizer).vocab_size)


def run_dir_for(cfg: Any) -> Path:
    """``<run.output_root>/<run.name>``."""
    return Path(cfg.run.output_root) / cfg.run.name


class NetworkCall:
    """Adapts the engine (or a bare module) to the objective's network signature under autocast."""

    def __init__(self, module: Callable, precision: str, device: torch.device, diffusion: bool) -> None:
        self.module, self.precision, self.device, self.diffusion = module, precision, device, diffusion

    def __call__(self, *args: Any) -> torch.Tensor:
        with autocast_context(self.precision, self.device):
            return self.module(*args)


def _micro_seed(seed: int, step: int, rank: int, micro: int) -> int:
    """A per-(step, rank, micro-batch) seed for the corruption noise: resume-exact without RNG state."""
    return (seed * 1_000_003 + step) * 65_537 + rank * 257 + micro


def make_skippable(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Let the trainer veto one optimizer update (non-finite loss) without touching Adam's state.

    DeepSpeed calls ``optimizer.step()`` on the client optimizer (ZeRO hands it the fp32 partitions);
    with ``optimizer.skip_next = True`` that call returns at once, so neither the weights nor the
    moments nor Adam's step count change. The LR schedule still advances by one step.
    """
    inner_step = optimizer.step
    optimizer.skip_next = False

    def step(self: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        if self.skip_next:
            self.skip_next = False
            return None
        return inner_step(*args, **kwargs)

    # A bound method, as torch's LR schedulers expect (they wrap ``optimizer.step.__func__``).
    optimizer.step = types.MethodType(step, optimizer)
    return optimizer


class TrainStep:
    """One optimizer step: ``accumulation`` micro-batches through the DeepSpeed engine.

    Times: the global stratified vector of step ``step`` (SPEC 3), sliced at
    ``(micro_index * world + rank) * micro_batch``; corruption noise from a generator seeded by
    (seed, step, rank, micro_index). A non-finite loss on any rank vetoes the update on every rank.
    """

    def __init__(self, *, engine: Any, objective: Any, components: Components, cfg: Any, rank: int,
                 world_size: int, device: torch.device, timer: Any, optimizer: Any, ema: Any = None) -> None:
        from udmtrain.engine import deepspeed_engine as dse

        self.dse = dse
        self.engine, self.objective, self.components = engine, objective, components
        self.cfg, self.rank, self.world, self.device = cfg, rank, world_size, device
        self.timer, self.ema, self.optimizer = timer, ema, optimizer
        self.micro = cfg.engine.micro_batch_size
        self.global_batch = cfg.engine.global_batch_size
        self.accumulation = self.global_batch // (self.micro * world_size)
        self.network = NetworkCall(engine, cfg.engine.precision, device, components.is_diffusion)
        self.time_kind = getattr(cfg.loss.cfg, "time_sampling", "antithetic")
        self.eps = getattr(cfg.schedule.cfg, "eps", 1e-3) if cfg.schedule is not None else 0.0
        self.last_grad_norm: float | None = None

    def _times(self, step: int, micro_index: int) -> torch.Tensor | None:
        if not self.components.is_diffusion:
            return None
        from udmtrain.diffusion.time_sampling import sample_times

        start = (micro_index * self.world + self.rank) * self.micro
        return sample_times(self.time_kind, self.global_batch, step, self.cfg.run.seed, self.eps, start,
                            self.micro).to(self.device)

    def __call__(self, batches: Any, step: int):
        from udmtrain.train.trainer import StepResult

        sums = torch.zeros(3, dtype=torch.float64)  # loss_sum, nelbo_sum, tokens
        finite = True
        for micro_index in range(self.accumulation):
            with self.timer("data"):
                batch = next(batches)
                x0_BL = batch["input_ids"].to(self.device, non_blocking=True)
                valid_BL = batch["valid"].to(self.device, non_blocking=True)
            gen = torch.Generator(device=self.device)
            gen.manual_seed(_micro_seed(self.cfg.run.seed, step, self.rank, micro_index))
            with self.timer("forward"):
                out = self.objective(self.network, x0_BL, valid_BL, self._times(step, micro_index), gen)
            finite = finite and bool(torch.isfinite(out.loss).item())
            with self.timer("backward"):
                self.engine.backward(out.loss)
            sums += torch.stack([out.loss_sum.double().cpu(), out.nelbo_sum.double().cpu(),
                                 out.num_tokens.double().cpu()])
            if micro_index == self.accumulation - 1:
                finite = self._all_ranks_finite(finite)
                self.optimizer.skip_next = not finite
            with self.timer("optimizer"):
                norm = self.dse.step(self.engine)
        self.last_grad_norm = norm if finite else None
        if finite and self.ema is not None:
            with self.timer("optimizer"), self.dse.gathered_parameters(self.engine.module):
                self.ema.update(self.engine.module)
        totals = self._all_reduce_sum(sums)
        tokens = max(totals[2].item(), 1.0)
        return StepResult(loss=totals[0].item() / tokens, nelbo=totals[1].item() / tokens,
                          num_tokens=int(totals[2].item()), skipped=not finite)

    def _all_ranks_finite(self, finite: bool) -> bool:
        import torch.distributed as tdist

        if not tdist.is_initialized() or tdist.get_world_size() == 1:
            return finite
        flag = torch.tensor([0.0 if finite else 1.0], device=self._comm_device())
        tdist.all_reduce(flag, op=tdist.ReduceOp.MAX)
        return flag.item() == 0.0

    def _all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        import torch.distributed as tdist

        if not tdist.is_initialized() or tdist.get_world_size() == 1:
            return values
        buf = values.to(self._comm_device())
        tdist.all_reduce(buf)
        return buf.cpu()

    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")


class Evaluator:
    """Validation NELBO (diffusion) or exact NLL (AR) on the validation shards, with EMA weights.

    Decides its own cadence (``should_eval``); every rank takes part (the estimate is all-reduced).
    """

    def __init__(self, *, cfg: Any, components: Components, engine: Any, ema: Any, rank: int,
                 world_size: int, device: torch.device) -> None:
        self.cfg, self.components, self.engine, self.ema = cfg, components, engine, ema
        self.rank, self.world, self.device = rank, world_size, device
        self.every = cfg.eval.every

    def should_eval(self, step: int) -> bool:
        return bool(self.cfg.data.valid_shards) and self.every > 0 and step % self.every == 0

    def batches(self):
        from udmtrain.data.loader import build_valid_loader

        loader = build_valid_loader(self.cfg.data, self.cfg.engine.micro_batch_size, self.rank, self.world)
        limit = self.cfg.eval.num_batches
        for i, batch in enumerate(loader):
            if limit is not None and i >= limit:
                break
            yield {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}

    def __call__(self, step: int) -> dict:
        from udmtrain.engine import deepspeed_engine as dse
        from udmtrain.eval.ppl import estimate_nelbo, exact_ar_nll, torch_all_reduce_sum

        module = self.engine.module
        was_training = module.training
        module.eval()
        network = NetworkCall(module, self.cfg.engine.precision, self.device, self.components.is_diffusion)
        reduce = torch_all_reduce_sum if self.world > 1 else None
        try:
            with torch.no_grad(), contextlib.ExitStack() as stack:
                if self.ema is not None:
                    stack.enter_context(ema_weights(module, self.ema))
                if self.components.is_diffusion:
                    fn = nelbo_fn(self.components, network)
                    result = estimate_nelbo(fn, self.batches(), num_t_samples=self.cfg.eval.num_t_samples,
                                            seed=self.cfg.run.seed + step, eps=self._eps(),
                                            all_reduce_sum=reduce, rank=self.rank)
                else:
                    result = exact_ar_nll(ar_nll_fn(self.components, network), self.batches(),
                                          all_reduce_sum=reduce)
        finally:
            module.train(was_training)
        return {f"val/{k}": result[k] for k in ("nll", "ppl", "bpd") if k in result}

    def _eps(self) -> float:
        return float(getattr(self.cfg.schedule.cfg, "eps", 1e-3))


@contextlib.contextmanager
def ema_weights(module: torch.nn.Module, ema: Any):
    """Within the block ``module`` computes with the EMA weights; restored bit-exactly afterwards.

    Under ZeRO-3 the weights are written inside ``GatheredParameters(modifier_rank=0)`` (DeepSpeed
    re-partitions them on exit) and the forward passes run *outside* any gathered context, so the
    engine's own parameter fetching is never mixed with a manual gather. The backup is a CPU copy.
    """
    from udmtrain.engine import deepspeed_engine as dse

    with torch.no_grad(), dse.gathered_parameters(module, modifier_rank=0):
        backup = {name: p.detach().to("cpu", copy=True) for name, p in module.named_parameters()}
        ema.copy_to(module)
    try:
        yield module
    finally:
        with torch.no_grad(), dse.gathered_parameters(module, modifier_rank=0):
            for name, p in module.named_parameters():
                p.copy_(backup[name])


def nelbo_fn(components: Components, network: Callable) -> Callable:
    """``(x0_BL, valid_BL, t_B, generator) -> per-token NELBO [B, L]`` for ``udmtrain.eval.ppl``."""
    objective = components.objective

    def fn(x0_BL, valid_BL, t_B, generator):
        return objective.per_token_nelbo(network, x0_BL, t_B, generator)

    return fn


def ar_nll_fn(components: Components, network: Callable) -> Callable:
    """``(x_BL, valid_BL) -> (nll_BL, scored_BL)``: exact next-token NLL of the AR baseline."""
    loss = components.loss

    def fn(x_BL, valid_BL):
        return loss.per_token(network(x_BL).float(), x_BL), loss.counted(valid_BL)

    return fn


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
    from udmtrain.engine.optim import build_lr_schedule, build_optimizer
    from udmtrain.models.ema import EMA
    from udmtrain.models.flops import flops_per_token
    from udmtrain.train.checkpoint import Checkpointer
    from udmtrain.train.metrics import MetricLogger, StepTimer, measure_peak_flops
    from udmtrain.train.signals import GracefulExit
    from udmtrain.train.state import TrainState
    from udmtrain.train.trainer import Trainer

    rank, world, device = dse.init_distributed()
    manifest = check_manifest(cfg.data, expected_tokenizer=cfg.tokenizer)
    torch.manual_seed(cfg.run.seed)
    vocab_size = resolve_vocab_size(cfg, manifest)
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

    engine = dse.create_engine(
        components.model, make_optimizer,
        build_lr_schedule(cfg.lr_schedule.name, cfg.lr_schedule.cfg, cfg.train.max_steps),
        dse.build_ds_config(cfg.engine, world), compile=cfg.engine.compile)
    ema = None
    if cfg.train.ema_decay > 0:
        with dse.gathered_parameters(engine.module):
            ema = EMA(engine.module, decay=cfg.train.ema_decay)
    state = TrainState()
    checkpointer = Checkpointer(run_dir, cfg.checkpoint.every, cfg.checkpoint.keep_last, cfg.checkpoint.resume)
    train_loader = build_train_loader(cfg.data, cfg.engine.micro_batch_size, rank, world, cfg.run.seed)
    resume_dir = checkpointer.find_resume()
    if resume_dir is not None:
        print0(f"resuming from {resume_dir}")
        checkpointer.load(engine, resume_dir, state, recipe_dict)
        train_loader.load_state_dict(state.data_cursor)
        if ema is not None and state.ema is not None:
            ema.load_state_dict(state.ema)
    batches = iter(train_loader)
    metrics = MetricLogger(run_dir, rank, cfg.train.log_every, cfg.train.max_steps)
    timer = StepTimer()
    step_fn = TrainStep(engine=engine, objective=components.objective, components=components, cfg=cfg,
                        rank=rank, world_size=world, device=device, timer=timer, optimizer=created[0], ema=ema)
    evaluator = Evaluator(cfg=cfg, components=components, engine=engine, ema=ema, rank=rank,
                          world_size=world, device=device)
    peak = measure_peak_flops(device, torch.bfloat16 if cfg.engine.precision == "bf16" else torch.float32)

    def throughput(seconds: float, tokens: int) -> dict:
        tokens_per_s = tokens / max(seconds, 1e-9)
        return {"perf/tokens_per_s": tokens_per_s, "perf/step_s": seconds,
                "perf/mfu": flops * tokens_per_s / (peak * world)}

    def save(step: int) -> None:
        state.data_cursor = train_loader.state_dict()
        state.ema = ema.state_dict() if ema is not None else None
        checkpointer.save(engine, step, state, recipe_dict, {"run_name": cfg.run.name, "vocab_size": vocab_size})

    def weights_finite() -> bool:
        # Each rank checks what it holds (ZeRO-3: its partition), then all ranks agree.
        local = all(bool(torch.isfinite(getattr(p, "ds_tensor", p)).all()) for p in engine.module.parameters())
        return step_fn._all_ranks_finite(local)

    signals = GracefulExit().__enter__()
    trainer = Trainer(
        state=state, max_steps=cfg.train.max_steps, max_nonfinite_steps=cfg.train.max_nonfinite_steps,
        batches=batches, step_fn=step_fn, metrics=metrics, should_eval=evaluator.should_eval,
        evaluate=evaluator, should_save=checkpointer.should_save, save=save, weights_finite=weights_finite,
        stop_requested=signals.should_exit, timer=timer, throughput=throughput,
        lr_fn=lambda: engine.get_lr()[0], grad_norm_fn=lambda: step_fn.last_grad_norm)

    def close() -> None:
        signals.__exit__(None, None, None)
        metrics.close()
        close_loader = getattr(train_loader, "close", None)
        if close_loader is not None:
            close_loader()
        dse.teardown()

    print0(f"udmtrain: run {cfg.run.name} -> {run_dir} | world {world} on {device} | "
           f"{sum(getattr(p, 'ds_numel', p.numel()) for p in engine.module.parameters()):,} parameters | "
           f"resume from {resume_dir or 'scratch'} at step {state.step}")
    return Run(trainer=trainer, close=close, run_dir=run_dir)
