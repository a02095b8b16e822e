"""Validation during training: NELBO bound (diffusion) or exact NLL (AR) with the EMA weights."""

from __future__ import annotations

import collections
import contextlib
from typing import Any, Callable, Iterable, Iterator

import torch

from udmtrain.train.components import Components, NetworkCall


class Evaluator:
    """Validation NELBO (diffusion) or exact NLL (AR) on the validation shards, with EMA weights.

    Decides its own cadence (``should_eval``); every rank takes part (the estimate is all-reduced).
    With ``data.document_attention`` the batches pass through ``BatchDocIds``, so the NELBO / NLL
    functions see each batch's ``doc_ids`` although ``udmtrain.eval.ppl`` hands them tokens only.
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
        from udmtrain.eval.ppl import estimate_nelbo, exact_ar_nll, torch_all_reduce_sum

        module = self.engine.module
        was_training = module.training
        module.eval()
        network = NetworkCall(module, self.cfg.engine.precision, self.device, self.components.is_diffusion)
        reduce = torch_all_reduce_sum if self.world > 1 else None
        doc_ids_of = BatchDocIds(self.batches()) if self.cfg.data.document_attention else None
        batches = doc_ids_of if doc_ids_of is not None else self.batches()
        try:
            with torch.no_grad(), contextlib.ExitStack() as stack:
                if self.ema is not None:
                    stack.enter_context(ema_weights(module, self.ema))
                if self.components.is_diffusion:
                    fn = nelbo_fn(self.components, network, doc_ids_of=doc_ids_of)
                    result = estimate_nelbo(fn, batches, num_t_samples=self.cfg.eval.num_t_samples,
                                            seed=self.cfg.run.seed + step, eps=self._eps(),
                                            all_reduce_sum=reduce, rank=self.rank)
                else:
                    result = exact_ar_nll(ar_nll_fn(self.components, network, doc_ids_of=doc_ids_of),
                                          batches, all_reduce_sum=reduce)
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


class BatchDocIds:
    """Iterates ``batches`` unchanged and remembers each batch's ``doc_ids``, so that a function
    called with that batch's ``input_ids`` tensor can look them up: ``doc_ids_of(x_BL) -> [B, L]``.

    ``udmtrain.eval.ppl.estimate_nelbo`` / ``exact_ar_nll`` call their ``nelbo_fn(x0_BL, valid_BL,
    t_B, generator)`` / ``nll_fn(x_BL, valid_BL)`` with the tokens only; passing the same iterator
    as ``batches`` and as ``doc_ids_of`` to ``nelbo_fn`` / ``ar_nll_fn`` threads the document ids
    through without changing that signature. The lookup is by tensor identity (the estimators hand
    the batch's own ``input_ids`` tensor through), falling back to equal values; the last
    ``keep`` batches are remembered, so a one-batch prefetch is harmless.
    """

    def __init__(self, batches: Iterable[dict], keep: int = 2) -> None:
        self._batches = batches
        self._recent: collections.deque = collections.deque(maxlen=keep)

    def __iter__(self) -> Iterator[dict]:
        for index, batch in enumerate(self._batches):
            if "doc_ids" not in batch or "input_ids" not in batch:
                raise KeyError(f"data.document_attention is true but validation batch {index} has no "
                               f"'input_ids'/'doc_ids' (keys: {sorted(batch)}); use shards written by "
                               "tools/prepare_data.py or set data.document_attention=false")
            self._recent.append((batch["input_ids"], batch["doc_ids"]))
            yield batch

    def __call__(self, x_BL: torch.Tensor) -> torch.Tensor:
        """The ``doc_ids`` ``[B, L]`` of the batch whose ``input_ids`` is ``x_BL``."""
        for ids_BL, doc_ids_BL in reversed(self._recent):
            if ids_BL is x_BL:
                return doc_ids_BL.to(x_BL.device)
        for ids_BL, doc_ids_BL in reversed(self._recent):
            if ids_BL.shape == x_BL.shape and torch.equal(ids_BL.to(x_BL.device), x_BL):
                return doc_ids_BL.to(x_BL.device)
        raise LookupError(f"no recent validation batch has these input_ids (shape {tuple(x_BL.shape)}); "
                          "iterate the BatchDocIds object itself as the estimator's batches")


def nelbo_fn(components: Components, network: Callable, doc_ids_of: Callable | None = None) -> Callable:
    """``(x0_BL, valid_BL, t_B, generator) -> per-token NELBO [B, L]`` for ``udmtrain.eval.ppl``.

    ``doc_ids_of`` (optional, e.g. a ``BatchDocIds``): ``x0_BL -> doc_ids_BL``; when given, the
    network is called with ``doc_ids_BL`` (document attention mask), else exactly as before.
    """
    objective = components.objective

    def fn(x0_BL, valid_BL, t_B, generator):
        if doc_ids_of is None:
            return objective.per_token_nelbo(network, x0_BL, t_B, generator)
        return objective.per_token_nelbo(network, x0_BL, t_B, generator, doc_ids_BL=doc_ids_of(x0_BL))

    return fn


def ar_nll_fn(components: Components, network: Callable, doc_ids_of: Callable | None = None) -> Callable:
    """``(x_BL, valid_BL) -> (nll_BL, scored_BL)``: exact next-token NLL of the AR baseline.

    ``doc_ids_of`` (optional): ``x_BL -> doc_ids_BL``, as for ``nelbo_fn``; the network is then called
    with ``doc_ids_BL`` (causal attention within each document).
    """
    loss = components.loss

    def fn(x_BL, valid_BL):
        kwargs = {} if doc_ids_of is None else {"doc_ids_BL": doc_ids_of(x_BL)}
        return loss.per_token(network(x_BL, **kwargs).float(), x_BL), loss.counted(valid_BL)

    return fn
