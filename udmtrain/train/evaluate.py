"""Validation during training: NELBO bound (diffusion) or exact NLL (AR) with the EMA weights."""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch

from udmtrain.train.components import Components, NetworkCall


class Evaluator:
    """Validation NELBO (diffusion) or exact NLL (AR) on the validation shards, with EMA weights.

    Decides its own cadence (``should_eval``); every rank takes part (the estimate is all-reduced).
    With ``data.document_attention`` the estimators pass each batch's ``doc_ids`` to the NELBO / NLL
    functions as ``doc_ids_BL`` (``doc_batch_kwargs``).
    """

    def __init__(self, *, cfg: Any, components: Components, engine: Any, ema: Any, rank: int,
                 world_size: int, device: torch.device,
                 text_samples: Callable[[Callable, int], None] | None = None) -> None:
        self.cfg, self.components, self.engine, self.ema = cfg, components, engine, ema
        self.text_samples = text_samples  # (network, step): decoded samples to TensorBoard, same weights
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
        from udmtrain.eval.ppl import estimate_nelbo, exact_ar_nll
        from udmtrain.utils.dist import all_reduce_sum

        module = self.engine.module
        was_training = module.training
        module.eval()
        network = NetworkCall(module, self.cfg.engine.precision, self.device)
        reduce = all_reduce_sum if self.world > 1 else None
        try:
            with torch.no_grad(), contextlib.ExitStack() as stack:
                if self.ema is not None:
                    stack.enter_context(ema_weights(module, self.ema))
                if self.components.is_diffusion:
                    result = estimate_nelbo(nelbo_fn(self.components, network), self.batches(),
                                            num_t_samples=self.cfg.eval.num_t_samples,
                                            seed=self.cfg.run.seed + step, eps=self.cfg.train.t_min,
                                            all_reduce_sum=reduce, rank=self.rank,
                                            batch_kwargs=doc_batch_kwargs(self.cfg))
                else:
                    result = exact_ar_nll(ar_nll_fn(self.components, network), self.batches(),
                                          all_reduce_sum=reduce, batch_kwargs=doc_batch_kwargs(self.cfg))
                if self.text_samples is not None:
                    self.text_samples(network, step)
        finally:
            module.train(was_training)
        return {f"val/{k}": result[k] for k in ("nll", "ppl", "bpd") if k in result}


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
    """``(x0_BL, valid_BL, t_B, generator, doc_ids_BL=None, prompt_BL=None) -> per-token NELBO [B, L]`` for
    ``udmtrain.eval.ppl.estimate_nelbo`` (which passes ``doc_ids_BL`` via ``batch_kwargs`` and
    ``prompt_BL`` for batches with prompt positions)."""
    objective = components.objective

    def fn(x0_BL, valid_BL, t_B, generator, doc_ids_BL=None, prompt_BL=None):
        return objective.per_token_nelbo(network, x0_BL, t_B, generator, doc_ids_BL=doc_ids_BL,
                                         prompt_BL=prompt_BL)

    return fn


def ar_nll_fn(components: Components, network: Callable) -> Callable:
    """``(x_BL, valid_BL, doc_ids_BL=None) -> (nll_BL, scored_BL)``: exact next-token NLL of the AR
    baseline (causal attention within each document when ``doc_ids_BL`` is given)."""
    loss = components.loss

    def fn(x_BL, valid_BL, doc_ids_BL=None):
        kwargs = {} if doc_ids_BL is None else {"doc_ids_BL": doc_ids_BL}
        return loss.per_token(network(x_BL, **kwargs).float(), x_BL), loss.counted(valid_BL)

    return fn


def doc_batch_kwargs(cfg: Any) -> dict[str, str]:
    """The estimators' ``batch_kwargs`` for ``data.document_attention``: ``{"doc_ids_BL": "doc_ids"}``."""
    return {"doc_ids_BL": "doc_ids"} if getattr(cfg.data, "document_attention", False) else {}
