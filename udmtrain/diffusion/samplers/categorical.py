"""Categorical draws, temperature and nucleus helpers shared by every sampler.

Shape legend: ``B`` batch, ``L`` sequence length, ``V`` states per position (``num_states``), ``K``
selected sites. All random numbers come from an explicit ``torch.Generator`` (docs/theory.md §10:
the global RNG makes ``generator_seed`` meaningless), drawn on the generator's device and moved
where needed.

Categorical draws are float64 inverse-CDF draws: ONE float64 uniform per position against the
float64 running sum of the weights (``cumsum`` + ``searchsorted``), instead of V float64 Gumbel
numbers per position. Why it is exact: let ``C_v = w_0 + ... + w_v`` (``C_{-1} = 0``) and
``T = u C_{V-1}`` with ``u`` uniform on ``[0, 1)``; the draw is the ``v`` with ``C_{v-1} <= T < C_v``,
so ``P(v) = (C_v - C_{v-1}) / C_{V-1} = w_v / sum w``. In floating point the only departures are
the rounding of the sums (relative ``~V 2^-53``, far below what any sampling test can see) and the
``2^-53`` grid of ``u``; a state of weight exactly 0 has ``C_v = C_{v-1}`` (adding 0 is exact), so
it is never drawn, and a tail state keeps its mass down to ``2^-53`` of the total, where float64
Gumbel-argmax truncated the Gumbel tail at ``~36.7``. The reverse kernels are mixtures
``a x + b e_z + c 1`` of a dense prediction ``x``, point masses and the uniform law:
:func:`sample_mixture` draws the component and the state with the same uniform, so the dense
weights are never scaled, shifted or copied.

For ``V >= TWO_LEVEL_MIN_STATES`` the inverse CDF runs in two levels (:class:`DenseCDF`): the states
are cut into ``nb`` blocks of ``b = ceil(sqrt V)`` consecutive states; one reduction gives the block
masses ``S_j`` (the only ``[B, L, V]`` pass: a read, with an ``[B, L, nb]`` output), the target picks
block ``j`` with ``S_{<j} <= T < S_{<=j}`` (float64 running sum over the blocks), and the residual
``T - S_{<j}`` (uniform on ``[0, S_j)`` given ``j``) is searched in the float64 running sum of that
block's ``b`` weights alone. So ``P(v) = (S_j / S) (w_v / S_j) = w_v / S``. The block masses of
float32/bf16 weights are float32 sums (a float64 reduction would first convert all ``B L V`` weights,
which costs as much as the one-level running sum): each ``S_j`` carries a relative rounding error of
at most ``(b - 1) 2^-24`` (< 1.4e-5 at V = 50,257, typically ~1e-7), which scales the block's states'
probabilities by that factor, the same order as the rounding of the float32 weights themselves and
far below what any sampling test can see; float64 weights get float64 block sums. A residual rounded
past the block's running total takes the block's last state of positive weight.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

_TINY64 = torch.finfo(torch.float64).tiny


def uniform01(shape, generator: torch.Generator, device: torch.device | str | None = None) -> torch.Tensor:
    """float64 uniforms in the open interval ``(0, 1)`` of ``shape``, drawn with ``generator``.

    ``torch.rand`` returns ``[0, 1)``; the lower end is clamped to the smallest normal double so
    ``log`` never sees 0 (the upper end ``1 - 2^-53`` keeps ``-log u > 0``).
    """
    u = torch.rand(shape, generator=generator, device=generator.device, dtype=torch.float64)
    u = u.clamp_min_(_TINY64)
    return u if device is None else u.to(device)


def gumbel(shape, generator: torch.Generator, device=None) -> torch.Tensor:
    """Standard Gumbel noise ``g = -log(-log u)``, float64, of ``shape``."""
    return -torch.log(-torch.log(uniform01(shape, generator, device)))


def _uniform_BL(shape, generator: torch.Generator, device) -> torch.Tensor:
    """float64 uniforms on ``[0, 1)`` of ``shape`` (the inverse-CDF draws need no clamping)."""
    return torch.rand(shape, generator=generator, device=generator.device, dtype=torch.float64).to(device)


def _search(cum_BLV: torch.Tensor, target_BL: torch.Tensor) -> torch.Tensor:
    """Index ``v`` with ``C_{v-1} <= target < C_v`` per row -> ``[B, L]``, never past the last state
    of positive weight (``target`` may round up to the total)."""
    idx = torch.searchsorted(cum_BLV, target_BL.unsqueeze(-1), right=True)
    last = torch.searchsorted(cum_BLV, cum_BLV[..., -1:].contiguous(), right=False)  # first v: C_v = total
    return torch.minimum(idx, last).squeeze(-1)


def _fix_zero_weight(idx_BL: torch.Tensor, w_BLV: torch.Tensor, used_BL: torch.Tensor) -> torch.Tensor:
    """Guard against a zero-weight pick at the rows ``used_BL``. Impossible with a sequential float64
    ``cumsum`` (CPU), where ``C_v = C_{v-1} + 0`` is exact; a parallel scan (CUDA) may round two equal
    prefixes one ulp apart, which would give a zero-weight state ``~1e-16`` of the mass: such rows
    take their argmax instead (a ``[B, L]`` gather per step; the argmax only when it happens)."""
    bad = (w_BLV.gather(-1, idx_BL.unsqueeze(-1)).squeeze(-1) <= 0) & used_BL
    if bool(bad.any()):
        idx_BL = torch.where(bad, w_BLV.argmax(-1), idx_BL)
    return idx_BL


TWO_LEVEL_MIN_STATES = 1024
"""From this many states on, dense draws search blocks first (below it one running sum is as fast)."""


class DenseCDF:
    """Inverse CDF of non-negative weights ``w_BLV`` (any float dtype, not modified; may be a strided
    view such as ``drop_state``'s) in float64: ``total_BL`` and ``find(target_BL, used_BL) -> [B, L]``.

    One level below ``TWO_LEVEL_MIN_STATES`` (the float64 running sum over all states), two levels from
    there on (module docstring): block masses by one reduction, then the float64 running sum of the
    chosen block's ``b`` weights only.
    """

    def __init__(self, w_BLV: torch.Tensor) -> None:
        self.w = w_BLV
        V = w_BLV.shape[-1]
        if V < TWO_LEVEL_MIN_STATES:
            self.block = 0
            self.cum = torch.cumsum(w_BLV, dim=-1, dtype=torch.float64)
            self.total = self.cum[..., -1]
            return
        self.block = b = math.isqrt(V - 1) + 1  # ceil(sqrt V)
        full = V // b
        acc = torch.float64 if w_BLV.dtype == torch.float64 else torch.float32  # module docstring: why float32
        sums = w_BLV[..., : full * b].unflatten(-1, (full, b)).sum(-1, dtype=acc)  # [B, L, nb]
        if full * b < V:  # the last, shorter block
            sums = torch.cat([sums, w_BLV[..., full * b:].sum(-1, keepdim=True, dtype=acc)], dim=-1)
        self.cum = sums.to(torch.float64).cumsum(-1)  # block running sums [B, L, nb]
        self.total = self.cum[..., -1]

    def find(self, target_BL: torch.Tensor, used_BL: torch.Tensor) -> torch.Tensor:
        """The ``v`` with ``C_{v-1} <= target < C_v`` per position (``target`` in ``[0, total)``; a
        rounded-up target gives the last state of positive weight); ``used_BL`` marks the positions
        whose draw is kept (the zero-weight guard looks only there)."""
        if not self.block:
            return _fix_zero_weight(_search(self.cum, target_BL), self.w, used_BL)
        b, V = self.block, self.w.shape[-1]
        j_BL = _search(self.cum, target_BL)  # never a block of zero mass
        before = torch.where(j_BL > 0, self.cum.gather(-1, (j_BL - 1).clamp_min(0).unsqueeze(-1)).squeeze(-1),
                             torch.zeros_like(target_BL))
        rest = (target_BL - before).clamp_min_(0.0)  # uniform on [0, S_j) given the block
        idx_BLb = j_BL.unsqueeze(-1) * b + torch.arange(b, device=j_BL.device)
        inside = idx_BLb < V  # the last block may be shorter
        fine = self.w.gather(-1, idx_BLb.clamp_max(V - 1)).to(torch.float64).masked_fill_(~inside, 0.0)
        pick = j_BL * b + _search(fine.cumsum(-1), rest)
        return _fix_zero_weight(pick, self.w, used_BL)


def sample_from_probs(probs_BLV: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Categorical draw from non-negative, possibly un-normalised weights ``[B, L, V]`` -> ``[B, L]``.

    Exact float64 inverse CDF (module docstring): ``P(v) = w_v / sum_v w_v``; zero weights are never
    drawn. ``probs_BLV`` may be float32 (the running sum is accumulated in float64 either way) and is
    not modified.
    """
    return sample_mixture(generator, dense_BLV=probs_BLV)


def drop_state(probs_BLV: torch.Tensor, state: int) -> torch.Tensor:
    """``probs_BLV`` with state ``state`` given weight 0, for :func:`sample_mixture` / :func:`sample_from_probs`.

    The last state (the masked process's mask id) is dropped by a view of the first ``V - 1`` columns
    (no copy; the draws are the same indices); any other state by an out-of-place ``index_fill``.
    """
    V = probs_BLV.shape[-1]
    if state == V - 1:
        return probs_BLV[..., : V - 1]
    return probs_BLV.index_fill(-1, torch.tensor([state], device=probs_BLV.device), 0.0)


def probs_from_logp(logp_BLV: torch.Tensor) -> torch.Tensor:
    """``exp(logp)`` of normalised log-probs ``[B, L, V]`` (rows summing to 1, as every sampler's
    prediction is), computed as ``softmax(logp)``: the same numbers up to float rounding.

    Why not ``exp``: predictions hold -1e6 (``NEG_LOGIT``) at suppressed states and in carried-over
    rows, and the CPU ``exp`` kernel takes a slow path for inputs far below the float32 range (measured
    ~10x slower on a whole ``[8, 128, 4097]`` prediction: 27 ms vs 2.8 ms); the softmax kernel does not.
    """
    return torch.softmax(logp_BLV, dim=-1)


def sample_categorical(logp_BLV: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Draw ``v ~ softmax(logp)`` per row -> LongTensor ``[B, L]``.

    ``logp_BLV`` may be un-normalised log-weights (a per-row shift changes nothing) and may hold
    ``-inf`` for impossible states. The weights ``softmax(logp)`` are formed in float64 (no underflow
    above ``e^-745`` of the row maximum; softmax rather than ``exp(logp - max)``: see
    :func:`probs_from_logp`) and drawn with :func:`sample_from_probs`.
    """
    return sample_from_probs(torch.softmax(logp_BLV.to(torch.float64), dim=-1), generator)


def sample_mixture(generator: torch.Generator, *, dense_BLV: torch.Tensor | None = None, dense_weight=1.0,
                   atoms: Sequence[tuple[torch.Tensor, torch.Tensor]] = (), uniform_weight=None,
                   num_states: int | None = None) -> torch.Tensor:
    """One draw per position from ``w = a x + sum_k b_k e_{i_k} + c 1_V`` (un-normalised) -> ``[B, L]``.

    * ``dense_BLV``: ``x``, non-negative ``[B, L, V]`` weights (any float dtype, not modified, need not
      sum to 1) with ``dense_weight`` ``a`` (float, ``[B, 1]`` or ``[B, L]``; >= 0);
    * ``atoms``: point masses ``(i_BL, b)``: LongTensor ``[B, L]`` state and weight ``b >= 0`` (float,
      ``[B, 1]`` or ``[B, L]``);
    * ``uniform_weight``: ``c >= 0``, the same weight on each of the ``num_states`` states.

    Exact (module docstring): with masses ``m_k`` (``b_k``, ``c V``, ``a sum x`` in that order) and one
    uniform ``T = u sum m``, the component is the ``k`` with ``M_{k-1} <= T < M_k`` (``M`` the running
    sum of the masses), chosen with probability ``m_k / sum m``; given it, ``T - M_{k-1}`` is uniform on
    ``[0, m_k)``, which picks the state inside the component: the atom itself, ``floor((T - M) / c)``
    for the uniform law, and the inverse CDF of ``x`` at ``(T - M) / a`` for the dense part. Together
    ``P(v) = w_v / sum w``. Components of mass 0 are never chosen (empty interval).
    """
    ref = dense_BLV if dense_BLV is not None else atoms[0][0]
    shape, device = tuple(ref.shape[:2]), ref.device
    f64 = dict(dtype=torch.float64, device=device)

    def mass(value) -> torch.Tensor:  # float / [B, 1] / [B, L] -> float64 [B, L]
        return torch.as_tensor(value, device=device).to(**f64).expand(shape)

    u = _uniform_BL(shape, generator, device)
    masses = [mass(b) for _, b in atoms]
    states = [i for i, _ in atoms]
    if uniform_weight is not None:
        V = int(num_states if num_states is not None else dense_BLV.shape[-1])
        c = mass(uniform_weight)
        masses.append(c * V)
    cdf = None
    if dense_BLV is not None:
        cdf = DenseCDF(dense_BLV)
        a = mass(dense_weight)
        masses.append(a * cdf.total)
    bounds = torch.stack(masses, dim=-1).cumsum(-1)  # M_k, [B, L, K]
    target = u * bounds[..., -1]  # < M_last (u <= 1 - 2^-53 and round-to-nearest)
    comp = torch.searchsorted(bounds, target.unsqueeze(-1), right=True).squeeze(-1)
    comp = comp.clamp_max_(bounds.shape[-1] - 1)
    lower = torch.cat([torch.zeros_like(bounds[..., :1]), bounds[..., :-1]], dim=-1)
    rest = (target - lower.gather(-1, comp.unsqueeze(-1)).squeeze(-1)).clamp_min_(0.0)  # in [0, m_comp)
    out = torch.zeros(shape, dtype=torch.long, device=device)
    k = 0
    for i_BL in states:
        out = torch.where(comp == k, i_BL.to(device), out)
        k += 1
    if uniform_weight is not None:
        pick = torch.floor(rest / torch.where(c > 0, c, torch.ones_like(c))).long().clamp_(0, V - 1)
        out = torch.where(comp == k, pick, out)
        k += 1
    if cdf is not None:
        safe_a = torch.where(a > 0, a, torch.ones_like(a))
        chosen = comp == k
        out = torch.where(chosen, cdf.find(rest / safe_a, chosen), out)
    return out


def bernoulli(prob: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Bool tensor shaped like ``prob``: True with probability ``prob`` (float64 uniforms)."""
    return uniform01(prob.shape, generator, prob.device) < prob.to(torch.float64)


def gumbel_topk(score_BL: torch.Tensor, k: int, tau: float, generator: torch.Generator,
                allowed_BL: torch.Tensor | None = None) -> torch.Tensor:
    """``k`` distinct positions per row, drawn without replacement with weights ``∝ exp(score/tau)``.

    Gumbel-top-k: ``topk(score/tau + g)`` is an exact draw of a size-k ordered sample without
    replacement from ``softmax(score/tau)`` (Vieira 2014, Kool et al. 2019). Positions with
    ``allowed_BL == False`` get ``-inf`` and are never chosen while allowed ones remain; the caller
    limits ``k`` to the number of allowed positions. Returns a bool mask ``[B, L]`` with ``k`` True
    per row (fewer where a row has fewer allowed positions).
    """
    B, L = score_BL.shape
    k = min(int(k), L)
    keys_BL = score_BL.to(torch.float64) / tau + gumbel((B, L), generator, score_BL.device)
    if allowed_BL is not None:
        keys_BL = keys_BL.masked_fill(~allowed_BL, float("-inf"))
    idx_BK = torch.topk(keys_BL, k, dim=-1).indices
    chosen_BL = torch.zeros(B, L, dtype=torch.bool, device=score_BL.device)
    chosen_BL.scatter_(1, idx_BK, True)
    if allowed_BL is not None:
        chosen_BL &= allowed_BL
    return chosen_BL


def temper(logp_BLV: torch.Tensor, temperature: float) -> torch.Tensor:
    """Tempered, renormalised log-probs ``log softmax(log p / T)`` (docs/theory.md §5.2), i.e. ``p^{1/T} / Z``.

    ``T = 1`` returns the input unchanged (no renormalisation round-off).
    """
    if temperature == 1.0:
        return logp_BLV
    return torch.log_softmax(logp_BLV / temperature, dim=-1)


def top_p_filter(logp_BLV: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus truncation (docs/theory.md §5.3) of normalised log-probs, renormalised -> ``[B, L, V]``.

    Per row: sort descending, keep the smallest prefix whose cumulative mass is ``>= top_p`` (the
    top-1 is always kept), set the rest to ``-inf`` and renormalise. ``top_p >= 1`` is the identity.
    A token is kept iff the mass strictly before it (in sorted order) is ``< top_p``.
    """
    if top_p >= 1.0:
        return logp_BLV
    sorted_logp, order = torch.sort(logp_BLV, dim=-1, descending=True)
    probs = sorted_logp.exp()
    mass_before = torch.cumsum(probs, dim=-1) - probs
    drop_sorted = mass_before >= top_p
    drop_sorted[..., 0] = False  # always keep the top-1, even for top_p <= p_max rounding
    drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
    return torch.log_softmax(logp_BLV.masked_fill(drop, float("-inf")), dim=-1)
