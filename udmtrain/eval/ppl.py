"""NELBO perplexity bound of a diffusion LM (and exact NLL of the AR baseline), with a standard error.

Legend: ``x0_BL`` LongTensor ``[B, L]`` clean tokens; ``valid_BL`` BoolTensor ``[B, L]`` (padding is
False); ``t_B`` float ``[B]`` diffusion times; ``nelbo_BL`` float ``[B, L]`` per-token NELBO integrand.

The quantity estimated (docs/theory.md §7, docs/theory.md §10.11) is, per sequence x,

    NELBO(x) = 1/(1-eps) * integral_eps^1  sum_l ell(x, t)_l  dt  =  E_{t ~ U[eps, 1]} [ sum_l ell_l ],

where ``ell`` is the process's NELBO integrand (``nelbo_fn``; it already contains the schedule weight),
so ``nll = sum_x NELBO(x) / sum_x #valid(x)`` (token-weighted, like ``val/nll``), ``ppl = exp(nll)``,
``bpd = nll / ln 2``. Prompt positions (a loader batch's ``prompt``: clean conditioning such as a
Sudoku puzzle) are not valid tokens: they are excluded from every count, and ``nelbo_fn`` receives
``prompt_BL=`` for batches that have any, so it keeps them clean. Hence
``nll`` is per *generated* token. Two estimators of the time integral:

* ``method="mc"``: K stratified ("antithetic") times per sequence, ``u ~ U[0, 1)`` per sequence and
  ``t_k = eps + (1 - eps) * ((u + k) / K)``, k = 0..K-1 (one point in each of the K equal strata), the
  per-sequence NELBO being the mean over k. Unbiased for any K (each t_k is marginally U[eps, 1]).
* ``method="quadrature"``: K-point Gauss-Legendre on [eps, 1] (deterministic nodes, weights summing to
  1). Exact for integrands polynomial in t of degree <= 2K-1; the forward-noise draw inside
  ``nelbo_fn`` stays random.

Standard error (ratio estimator, delta method). Sequences are treated as i.i.d. draws; with
``n_i`` the per-sequence NELBO estimate and ``T_i`` its token count, ``R = sum n_i / sum T_i`` and

    Var(R) ~= 1/(N * Tbar^2) * 1/(N-1) * sum_i (n_i - R T_i)^2,       Tbar = sum T_i / N,

which needs only the sums ``sum n, sum T, sum n^2, sum T^2, sum n T, N`` (so it all-reduces exactly
across ranks). It covers both sources of variation: the choice of sequences and the t / noise draws.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch

from udmtrain.utils.dist import all_reduce_sum as torch_all_reduce_sum  # noqa: F401 (the tools' name)

NelboFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]
"""``nelbo_fn(x0_BL, valid_BL, t_B, generator) -> nelbo_BL``: per-token NELBO integrand at time t."""
NllFn = Callable[[torch.Tensor, torch.Tensor], Any]
"""``nll_fn(x_BL, valid_BL) -> nll_BL`` or ``(nll_BL, scored_BL)``: per-token AR negative log-likelihood."""
AllReduceSum = Callable[[torch.Tensor], torch.Tensor]
"""Sums a float64 tensor over ranks and returns the sum (e.g. a wrapper of ``dist.all_reduce``)."""

METHODS = ("mc", "quadrature")
# Order of the float64 statistics vector that is all-reduced.
_STATS = ("sum_nelbo", "sum_tokens", "num_sequences", "sum_nelbo_sq", "sum_tokens_sq",
          "sum_nelbo_tokens", "num_ranks", "num_forward_calls")


def _split_batch(batch: Any, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A loader batch (``{"input_ids", "valid"}``, docs/architecture.md "Data") or a bare ``[B, L]`` tensor."""
    if isinstance(batch, torch.Tensor):
        x_BL = batch
        valid_BL = torch.ones_like(x_BL, dtype=torch.bool)
    elif isinstance(batch, Mapping):
        if "input_ids" not in batch:
            raise KeyError(f"evaluation batch {index} has no 'input_ids' (keys: {sorted(batch)}); "
                           "pass loader batches {'input_ids': LongTensor[B,L], 'valid': BoolTensor[B,L]}")
        x_BL = batch["input_ids"]
        valid_BL = batch.get("valid")
        if valid_BL is None:
            valid_BL = torch.ones_like(x_BL, dtype=torch.bool)
        prompt_BL = batch.get("prompt")
        if prompt_BL is not None:  # conditioning positions are never scored
            valid_BL = valid_BL.bool() & ~prompt_BL.bool()
    else:
        raise TypeError(f"evaluation batch {index} is a {type(batch).__name__}; expected a dict with "
                        "'input_ids'/'valid' or a LongTensor [B, L]")
    if x_BL.dim() != 2 or valid_BL.shape != x_BL.shape:
        raise ValueError(f"evaluation batch {index}: input_ids {tuple(x_BL.shape)} and valid "
                         f"{tuple(valid_BL.shape)} must both be [B, L]")
    return x_BL.long(), valid_BL.bool()


def _prompt_kwargs(batch: Any) -> dict[str, Any]:
    """``{"prompt_BL": batch["prompt"]}`` for a batch with prompt positions, else ``{}`` (so functions
    that do not know the keyword keep working on prompt-free data)."""
    if isinstance(batch, Mapping) and batch.get("prompt") is not None and bool(batch["prompt"].any()):
        return {"prompt_BL": batch["prompt"].bool()}
    return {}


def _batch_kwargs(batch: Any, batch_kwargs: Mapping[str, str], index: int) -> dict[str, Any]:
    """``{keyword: batch[key]}`` for the per-batch extras a function needs (e.g. ``doc_ids``)."""
    if not batch_kwargs:
        return {}
    if not isinstance(batch, Mapping) or any(key not in batch for key in batch_kwargs.values()):
        have = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
        raise KeyError(f"evaluation batch {index} lacks {sorted(batch_kwargs.values())} (has {have}); "
                       "use loader batches from shards written by tools/prepare_data.py")
    return {kw: batch[key] for kw, key in batch_kwargs.items()}


def gauss_legendre_times(num_nodes: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes ``t_k`` in [eps, 1] and weights ``w_k`` (sum 1) with
    ``1/(1-eps) int_eps^1 f(t) dt ~= sum_k w_k f(t_k)`` (exact for polynomials of degree <= 2K-1).
    Returns float64 ``[K]`` tensors."""
    x_K, w_K = np.polynomial.legendre.leggauss(num_nodes)  # on [-1, 1], weights sum to 2
    t_K = eps + (1.0 - eps) * (x_K + 1.0) / 2.0
    return torch.from_numpy(t_K), torch.from_numpy(w_K / 2.0)


def stratified_times(u_B: torch.Tensor, num_t_samples: int, eps: float) -> torch.Tensor:
    """``t[b, k] = eps + (1-eps) * (u_b + k) / K`` -> ``[B, K]`` (one time in each stratum per sequence)."""
    k_K = torch.arange(num_t_samples, dtype=u_B.dtype, device=u_B.device)
    return eps + (1.0 - eps) * torch.remainder((u_B[:, None] + k_K[None, :]) / num_t_samples, 1.0)


def _rank_seed(seed: int, rank: int) -> int:
    """Independent, reproducible per-rank stream: SeedSequence mixes (seed, rank) without collisions."""
    return int(np.random.SeedSequence([int(seed), int(rank)]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _finish(stats_S: torch.Tensor, all_reduce_sum: AllReduceSum | None, record: dict) -> dict:
    """All-reduce the statistics vector and turn it into nll / ppl / bpd / stderr (delta method)."""
    if all_reduce_sum is not None:
        stats_S = all_reduce_sum(stats_S.clone())
    s = dict(zip(_STATS, stats_S.tolist()))
    n, tokens = s["num_sequences"], s["sum_tokens"]
    if tokens <= 0:
        raise ValueError("no valid token was evaluated (every batch was empty or fully padded); "
                         "check eval.num_batches and the validation shards")
    nll = s["sum_nelbo"] / tokens
    if n >= 2:
        sum_sq_dev = s["sum_nelbo_sq"] - 2 * nll * s["sum_nelbo_tokens"] + nll**2 * s["sum_tokens_sq"]
        t_bar = tokens / n
        stderr = math.sqrt(max(sum_sq_dev, 0.0) / (n - 1) / n) / t_bar
    else:
        stderr = float("nan")
    out = {
        "nll": nll,
        "nll_stderr": stderr,
        "ppl": math.exp(nll) if nll < 700 else float("inf"),
        "ppl_ci95": [math.exp(nll - 1.96 * stderr), math.exp(nll + 1.96 * stderr)]
        if math.isfinite(stderr) and nll < 700 else None,
        "bpd": nll / math.log(2.0),
        "bpd_stderr": stderr / math.log(2.0),
        "num_sequences": int(n),
        "num_tokens": int(tokens),
        "num_ranks": int(s["num_ranks"]),
        "num_forward_calls": int(s["num_forward_calls"]),
        "stderr_method": "ratio estimator, delta method over i.i.d. sequences "
                         "(includes data and t/noise sampling variation)",
        "token_accounting": "valid tokens only (not padding, not prompt); sequences without a valid token skipped",
    }
    out.update(record)
    return out


def _accumulate(stats_S: torch.Tensor, seq_sum_B: torch.Tensor, tokens_B: torch.Tensor, calls: int) -> None:
    keep_B = tokens_B > 0
    n_B, T_B = seq_sum_B[keep_B].double(), tokens_B[keep_B].double()
    stats_S += torch.stack([n_B.sum(), T_B.sum(), keep_B.sum().double(), (n_B**2).sum(), (T_B**2).sum(),
                            (n_B * T_B).sum(), torch.zeros((), dtype=torch.float64),
                            torch.tensor(float(calls), dtype=torch.float64)])


def _check_finite(value_BL: torch.Tensor, valid_BL: torch.Tensor, what: str, index: int) -> None:
    bad = valid_BL & ~torch.isfinite(value_BL)
    if bool(bad.any()):
        b, l = (int(i) for i in bad.nonzero()[0])
        raise FloatingPointError(f"{what} is not finite in evaluation batch {index} at sequence {b}, "
                                 f"position {l} ({float(value_BL[b, l])}); the model or the loss overflowed")


@torch.no_grad()
def estimate_nelbo(nelbo_fn: NelboFn, batches: Iterable[Any], *, num_t_samples: int = 1, seed: int = 0,
                   eps: float = 1e-3, method: str = "mc", all_reduce_sum: AllReduceSum | None = None,
                   rank: int | None = None, protocol: Mapping[str, Any] | None = None,
                   batch_kwargs: Mapping[str, str] | None = None) -> dict:
    """Token-weighted NELBO bound ``nll = sum_x NELBO(x) / #valid tokens`` with its standard error.

    ``nelbo_fn(x0_BL, valid_BL, t_B, generator) -> [B, L]`` is called K times per batch (once per
    time sample; ``t_B`` float64 on the batch's device). ``batches`` yields loader batches
    (``{"input_ids", "valid"}``) or bare ``[B, L]`` tensors. ``all_reduce_sum`` makes it run on N ranks
    (every rank passes its own shard of batches; the statistics are summed once at the end).
    ``protocol`` (e.g. ``{"ema": True, "checkpoint": ...}``) is merged into the returned record, which
    also lists every estimator choice (method, K, eps, seed, counts). ``batch_kwargs`` maps extra
    ``nelbo_fn`` keywords to batch keys (``{"doc_ids_BL": "doc_ids"}`` for document attention). See
    the module docstring for the estimator and the delta-method standard error.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not isinstance(num_t_samples, int) or num_t_samples < 1:
        raise ValueError(f"num_t_samples must be a positive integer, got {num_t_samples!r}")
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"eps must be in [0, 1), got {eps}")
    if rank is None:
        from udmtrain.utils.dist import get_rank
        rank = get_rank()
    K = num_t_samples
    stats_S = torch.zeros(len(_STATS), dtype=torch.float64)
    stats_S[_STATS.index("num_ranks")] = 1.0
    generator = None
    if method == "quadrature":
        nodes_K, weights_K = gauss_legendre_times(K, eps)
    for index, batch in enumerate(batches):
        x0_BL, valid_BL = _split_batch(batch, index)
        extra = {**_batch_kwargs(batch, batch_kwargs or {}, index), **_prompt_kwargs(batch)}
        B, device = x0_BL.shape[0], x0_BL.device
        if generator is None:  # created on the data's device so nelbo_fn can draw noise there
            generator = torch.Generator(device=device).manual_seed(_rank_seed(seed, rank))
        if method == "mc":
            u_B = torch.rand(B, generator=generator, device=device, dtype=torch.float64)
            t_BK = stratified_times(u_B, K, eps)
            w_K = torch.full((K,), 1.0 / K, dtype=torch.float64)
        else:
            t_BK = nodes_K.to(device)[None, :].expand(B, K)
            w_K = weights_K
        seq_sum_B = torch.zeros(B, dtype=torch.float64, device=device)
        for k in range(K):
            nelbo_BL = nelbo_fn(x0_BL, valid_BL, t_BK[:, k].contiguous(), generator, **extra)
            if nelbo_BL.shape != x0_BL.shape:
                raise ValueError(f"nelbo_fn returned shape {tuple(nelbo_BL.shape)} for a batch of "
                                 f"shape {tuple(x0_BL.shape)}; it must return the per-token NELBO [B, L]")
            _check_finite(nelbo_BL, valid_BL, "the NELBO integrand", index)
            masked_BL = torch.where(valid_BL, nelbo_BL.double(), torch.zeros((), dtype=torch.float64,
                                                                               device=device))
            seq_sum_B += float(w_K[k]) * masked_BL.sum(-1)
        _accumulate(stats_S, seq_sum_B.cpu(), valid_BL.sum(-1).cpu(), K)
    record = {"estimator": "nelbo", "method": method, "num_t_samples": K, "eps": eps, "seed": seed,
              "time_sampling": ("stratified per sequence: t_k = eps + (1-eps)(u+k)/K, u ~ U[0,1)"
                                if method == "mc" else "Gauss-Legendre nodes on [eps, 1]"),
              "t_integral": "1/(1-eps) * int_eps^1 (docs/theory.md §10.11)"}
    if protocol:
        record.update(protocol)
    return _finish(stats_S, all_reduce_sum, record)


@torch.no_grad()
def exact_ar_nll(nll_fn: NllFn, batches: Iterable[Any], *, all_reduce_sum: AllReduceSum | None = None,
                 protocol: Mapping[str, Any] | None = None, batch_kwargs: Mapping[str, str] | None = None) -> dict:
    """Exact token-weighted NLL of an autoregressive model: ``nll = sum NLL / #counted tokens``.

    ``nll_fn(x_BL, valid_BL)`` returns the per-token NLL ``[B, L]`` (position l = -log p(x_l | x_<l)),
    or a pair ``(nll_BL, scored_BL)`` when some valid positions are not predicted (e.g. the first token
    when there is no BOS); counted tokens are ``valid & scored``. Same record as ``estimate_nelbo``
    (stderr over sequences), with ``estimator = "exact_ar"``; ``batch_kwargs`` as in ``estimate_nelbo``.
    """
    stats_S = torch.zeros(len(_STATS), dtype=torch.float64)
    stats_S[_STATS.index("num_ranks")] = 1.0
    for index, batch in enumerate(batches):
        x_BL, valid_BL = _split_batch(batch, index)
        out = nll_fn(x_BL, valid_BL, **_batch_kwargs(batch, batch_kwargs or {}, index))
        nll_BL, scored_BL = (out if isinstance(out, tuple) else (out, valid_BL))
        if nll_BL.shape != x_BL.shape or scored_BL.shape != x_BL.shape:
            raise ValueError(f"nll_fn returned shapes {tuple(nll_BL.shape)}/{tuple(scored_BL.shape)} for a "
                             f"batch of shape {tuple(x_BL.shape)}; it must return per-token values [B, L]")
        counted_BL = valid_BL & scored_BL.bool()
        _check_finite(nll_BL, counted_BL, "the AR NLL", index)
        seq_sum_B = torch.where(counted_BL, nll_BL.double(), torch.zeros((), dtype=torch.float64,
                                                                        device=x_BL.device)).sum(-1)
        _accumulate(stats_S, seq_sum_B.cpu(), counted_BL.sum(-1).cpu(), 1)
    record = {"estimator": "exact_ar", "method": "exact", "num_t_samples": None, "eps": None, "seed": None}
    if protocol:
        record.update(protocol)
    return _finish(stats_S, all_reduce_sum, record)
