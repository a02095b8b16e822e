"""Sampler base class: time grid, counted network calls, temperature/nucleus, prompt clamping.

Shape legend: ``B`` batch, ``L`` sequence length, ``V`` states per position (``process.num_states``:
V tokens for ``uniform``/``absorbing_uniform``, V+1 with the mask at id V for ``masked``).
``z_BL`` current state, ``noise_BL`` AUDM noise tokens ``n`` (None for other processes),
``alpha_B1`` float ``[B, 1]``.

Every sampler is ``Sampler(cfg, schedule, process, parameterization, *, time_conditioning=False)`` and
``sample(network, batch_size, seq_len, generator, prefix_BL=None, prefix_len=0, *, prompt_mask_BL=None)
-> SampleOutput`` (docs/architecture.md "Samplers"). ``time_conditioning`` says whether the network uses
its time input (a fact about the model, passed by ``udmtrain.train.components.build_sampler``, never a
recipe key). Conditioning tokens are clamped at every step at the positions of a prompt mask (bool
``[B, L]``, any positions: e.g. a Sudoku puzzle) or, the special case, at the first ``prefix_len``
positions; correctors never select them. ``network`` is any callable ``(xt_BL, sigma_B, noise_BL) ->
logits_BLV``; all calls go through :meth:`Sampler.call_network`, which counts the NFE and passes
``sigma_B = schedule.sigma(t_B)`` (float32, the network's time input). Random numbers come only from
the ``generator`` argument (docs/theory.md §10.3), so a seed fixes the samples.

The base class owns the time loop (:meth:`Sampler.generate`); a sampler supplies one step
(:meth:`Sampler.step`). What a sampler needs from the process is a set of capability words
(``needs``, see ``udmtrain.diffusion.process.CAPABILITIES``), checked by the recipe validator at config
time and again at construction; samplers never branch on the process's name.

Time grid (docs/theory.md §5.1): ``t_k = 1 - k/n``, ``k = 0..n``; step ``k`` goes from ``t_k`` to ``t_{k+1}``; the
last step lands on ``s = 0`` where ``alpha = 1`` and every kernel returns clean tokens.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch

from udmtrain.diffusion.process import PredictionKind
from udmtrain.diffusion.samplers import categorical as cat


def _name(obj: Any) -> str:
    cls = obj if isinstance(obj, type) else type(obj)
    return getattr(cls, "registry_name", cls.__name__)


def processes_with(needed: set[str] | frozenset[str]) -> list[str]:
    """Registered process names whose declared ``capabilities`` include all of ``needed``."""
    from udmtrain.registry import PROCESS

    return [n for n in PROCESS.names() if set(needed) <= set(getattr(PROCESS.get(n), "capabilities", ()))]


def unsupported_message(sampler: Any, process: Any, needed: frozenset[str]) -> str | None:
    """Why ``sampler`` (class or instance) cannot run on ``process`` (class or instance), or None if it can.

    Names the capabilities the process lacks and the registered processes that have them."""
    missing = sorted(set(needed) - set(getattr(process, "capabilities", frozenset())))
    if not missing:
        return None
    ok = processes_with(needed)
    return (f"sampler {_name(sampler)!r} works with process {ok}, not {_name(process)!r}: it needs the "
            f"process capabilities {missing}; choose another sampler (e.g. 'ancestral') or process")


@dataclass(frozen=True)
class SampleOutput:
    """Result of :meth:`Sampler.sample`."""

    tokens_BL: torch.Tensor
    """Final tokens, LongTensor ``[B, L]`` (never the mask id)."""
    nfe: int
    """Number of network calls actually made (== ``num_steps`` except when a cache skipped calls)."""
    noise_BL: torch.Tensor | None = None
    """Final AUDM noise tokens ``n`` (absorbing_uniform only), else None."""
    trajectory: tuple[torch.Tensor, ...] | None = None
    """States after every step (CPU copies) when ``record_trajectory`` is set, else None."""


@dataclass
class SamplingRun:
    """Mutable state of one ``sample`` call, passed to the step functions."""

    network: Callable[..., torch.Tensor]
    """``(xt_BL, sigma_B, noise_BL) -> logits_BLV``."""
    generator: torch.Generator
    """The only source of randomness."""
    z_BL: torch.Tensor
    """Current tokens (LongTensor ``[B, L]``)."""
    noise_BL: torch.Tensor | None
    """AUDM noise tokens ``n`` or None."""
    prefix_BL: torch.Tensor | None
    """Conditioning tokens (clamped where ``clamped_BL`` is True) or None."""
    prefix_len: int
    """Number of clamped leading positions (used when ``prompt_mask_BL`` is None)."""
    prompt_mask_BL: torch.Tensor | None = None
    """Bool ``[B, L]`` of clamped positions (``prefix_BL`` is then ``[B, L]``), or None: the prefix."""
    nfe: int = 0
    """Network calls so far."""
    trajectory: list[torch.Tensor] | None = None
    """States after each step when recording, else None."""
    cache: dict[str, Any] = field(default_factory=dict)
    """Sampler-private reusable predictions (the MDLM cache)."""

    @property
    def clamped_BL(self) -> torch.Tensor:
        """Bool ``[B, L]``: the conditioning positions (prompt mask, or the first ``prefix_len``)."""
        if self.prompt_mask_BL is not None:
            return self.prompt_mask_BL
        clamped = torch.zeros_like(self.z_BL, dtype=torch.bool)
        clamped[:, : self.prefix_len] = True
        return clamped

    @property
    def free_BL(self) -> torch.Tensor:
        """Bool ``[B, L]``: positions the sampler may change (False on the clamped prompt/prefix)."""
        return ~self.clamped_BL


class Sampler(abc.ABC):
    """Base of every sampler: owns the time loop; subclasses implement :meth:`step`.

    Subclasses declare what they need from the process in ``needs`` (capability words; settings-
    dependent needs via :meth:`required_capabilities`), checked by the recipe validator at config time
    and again here at construction.
    """

    @dataclass(kw_only=True, frozen=True)
    class Config:
        num_steps: int = 256
        """Number of network evaluations (NFE budget) of one ``sample`` call."""
        temperature: float = 1.0
        """Sampling temperature T > 0 (docs/theory.md §5.2); 1 leaves the model's distribution unchanged."""
        temperature_on: Literal["auto", "loo", "denoiser", "logits"] = "auto"
        """What T divides: 'logits' = raw network logits before the parameterization's conversion;
        'loo' / 'denoiser' = that posterior's log-probs (then renormalised, converted exactly if the
        kernel consumes the other object); 'auto' = 'loo' for the uniform process (the paper's LOO
        temperature sampling), 'denoiser' otherwise."""
        top_p: float = 1.0
        """Nucleus mass in (0, 1] applied to the per-position prediction the kernel consumes
        (docs/theory.md §5.3; top-1 always kept, renormalised); 1 disables it."""
        record_trajectory: bool = False
        """Keep a CPU copy of the state after every step in ``SampleOutput.trajectory``."""

    needs: ClassVar[frozenset[str]] = frozenset()
    """Capability words the process must declare (``udmtrain.diffusion.process.CAPABILITIES``)."""

    @classmethod
    def required_capabilities(cls, cfg: Any) -> frozenset[str]:
        """``needs`` plus what the settings ``cfg`` add (``temperature_on='loo'`` needs the LOO)."""
        return cls.needs | ({"loo_posterior"} if cfg.temperature_on == "loo" else frozenset())

    def __init__(self, cfg: Config, schedule: Any, process: Any, parameterization: Any, *,
                 time_conditioning: bool = False) -> None:
        self.cfg, self.schedule, self.process, self.param = cfg, schedule, process, parameterization
        self.time_conditioning = bool(time_conditioning)
        """Whether the network uses its time input (then no prediction may be reused across times)."""
        self.num_states = int(process.num_states)
        # number of real tokens (the mask is an extra state of the masked process)
        self.vocab_size = int(process.vocab_size)
        self.supports_loo = bool(process.supports_loo)
        self.mask_id = process.mask_id
        if cfg.temperature_on == "loo" and not self.supports_loo:
            ok = " or ".join(processes_with({"loo_posterior"}))
            raise ValueError(f"sampler.temperature_on='loo' needs the {ok} process (the LOO posterior exists "
                             f"only there), got process {_name(process)!r}; use 'denoiser' or 'logits'")
        message = unsupported_message(self, process, self.required_capabilities(cfg))
        if message is not None:
            raise ValueError(message)
        if cfg.num_steps < 1:
            raise ValueError(f"sampler.num_steps must be >= 1, got {cfg.num_steps}")
        if not cfg.temperature > 0:
            raise ValueError(f"sampler.temperature must be > 0, got {cfg.temperature}")
        if not 0.0 < cfg.top_p <= 1.0:
            raise ValueError(f"sampler.top_p must be in (0, 1], got {cfg.top_p}")
        mode = cfg.temperature_on
        if mode == "auto":
            mode = "loo" if self.supports_loo else "denoiser"
        self.temperature_on = mode

    # ------------------------------------------------------------------ public API
    def sample(self, network: Callable[..., torch.Tensor], batch_size: int, seq_len: int,
               generator: torch.Generator, prefix_BL: torch.Tensor | None = None,
               prefix_len: int = 0, *, prompt_mask_BL: torch.Tensor | None = None) -> SampleOutput:
        """Draw ``batch_size`` sequences of ``seq_len`` tokens.

        ``prefix_BL`` (LongTensor ``[B, >= prefix_len]``): positions ``< prefix_len`` are clamped to it
        at every step (conditional generation) and never selected by correctors. With
        ``prompt_mask_BL`` (bool ``[B, L]``) the clamped positions are those where it is True instead
        (any positions), ``prefix_BL`` is ``[B, L]`` and ``prefix_len`` must stay 0.
        """
        device = self._device(network, generator, prefix_BL)
        prefix = self._check_prefix(prefix_BL, prefix_len, batch_size, seq_len, device)
        mask = self._check_prompt_mask(prompt_mask_BL, prefix_BL, prefix_len, batch_size, seq_len, device)
        if mask is not None:
            prefix = self._check_prefix(prefix_BL, seq_len, batch_size, seq_len, device, mask)
        # the prior is drawn on the generator's device (a CPU generator may drive a GPU network)
        noised = self.process.prior(batch_size, seq_len, generator, generator.device)
        run = SamplingRun(network=network, generator=generator, z_BL=noised.xt_BL.to(device),
                          noise_BL=None if noised.noise_BL is None else noised.noise_BL.to(device),
                          prefix_BL=prefix, prefix_len=prefix_len, prompt_mask_BL=mask,
                          trajectory=[] if self.cfg.record_trajectory else None)
        self.clamp(run)
        self.generate(run)
        traj = tuple(run.trajectory) if run.trajectory is not None else None
        return SampleOutput(tokens_BL=run.z_BL, nfe=run.nfe, noise_BL=run.noise_BL, trajectory=traj)

    def generate(self, run: SamplingRun) -> None:
        """The time loop: ``step`` from each grid time to the next, then ``after_step``; updates ``run``.

        The grid has ``grid_steps()`` steps from t = 1 to t = 0 (``num_steps`` unless a sampler spends
        part of its NFE budget elsewhere, e.g. on corrector sweeps)."""
        times = self.time_grid(self.grid_steps())
        for k, (t, s) in enumerate(zip(times[:-1], times[1:])):
            self.step(run, t, s)
            self.record(run)
            self.after_step(run, k, s)

    @abc.abstractmethod
    def step(self, run: SamplingRun, t: float, s: float) -> None:
        """One reverse step from time ``t`` to ``s < t``, updating ``run.z_BL`` / ``run.noise_BL``."""

    def grid_steps(self) -> int:
        """Number of steps of the time grid (default ``num_steps``: one network call per step)."""
        return self.cfg.num_steps

    def after_step(self, run: SamplingRun, k: int, s: float) -> None:
        """Hook after step ``k`` (landing on ``s``) has been recorded; default: nothing."""

    # ------------------------------------------------------------------ helpers for subclasses
    def time_grid(self, num_steps: int) -> list[float]:
        """``[1, 1 - 1/n, ..., 0]`` (``n + 1`` floats, float64 arithmetic)."""
        return torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64).tolist()

    def alpha_B1(self, t: float, run: SamplingRun) -> torch.Tensor:
        """``alpha_t`` of the schedule as float64 ``[B, 1]`` (exactly 1 at ``t = 0``)."""
        B = run.z_BL.shape[0]
        if t <= 0.0:
            return torch.ones(B, 1, dtype=torch.float64, device=run.z_BL.device)
        t_B = torch.full((B,), t, dtype=torch.float64, device=run.z_BL.device)
        alpha_B, _ = self.schedule.alpha(t_B)
        return torch.as_tensor(alpha_B, dtype=torch.float64, device=run.z_BL.device).reshape(B, 1)

    def call_network(self, run: SamplingRun, t: float, sigma_B: torch.Tensor | None = None) -> torch.Tensor:
        """One counted network evaluation at time ``t`` on the current state -> logits ``[B, L, V]``.

        ``sigma_B`` defaults to ``schedule.sigma(t)``; samplers that warp time (ReMDM 'loop') pass
        ``-log alpha`` of their own alpha. The network's time input is float32.
        """
        B = run.z_BL.shape[0]
        if sigma_B is None:
            t_B = torch.full((B,), t, dtype=torch.float64, device=run.z_BL.device)
            sigma_B = self.schedule.sigma(t_B)
        sigma_B = torch.as_tensor(sigma_B, device=run.z_BL.device).to(torch.float32).reshape(B)
        run.nfe += 1
        return run.network(run.z_BL, sigma_B, run.noise_BL)

    def predict(self, run: SamplingRun, t: float, want: PredictionKind,
                alpha_B1: torch.Tensor | None = None, sigma_B: torch.Tensor | None = None) -> torch.Tensor:
        """The kernel's per-position prediction at ``t``: tempered, nucleus-truncated log-probs.

        ``want`` = ``"denoiser"`` (``log D``) or ``"loo"`` (``log Lo``, uniform only). Temperature per
        ``temperature_on`` (docs/theory.md §5.2): 'logits' divides the raw logits before the parameterization's
        conversion; 'loo'/'denoiser' temper that object, renormalise, and convert exactly to ``want``
        with ``functional.loo_to_denoiser`` / ``denoiser_to_loo`` when it differs. Then top-p
        (docs/theory.md §5.3). Returns ``[B, L, V]`` float32 (float64 if the network returns float64).
        """
        alpha = self.alpha_B1(t, run) if alpha_B1 is None else alpha_B1
        logits = self.call_network(run, t, sigma_B)
        return self.prediction_from_logits(logits, run, alpha, want)

    def prediction_from_logits(self, logits_BLV: torch.Tensor, run: SamplingRun,
                               alpha_B1: torch.Tensor, want: PredictionKind) -> torch.Tensor:
        """Tempered + nucleus prediction from given logits (see :meth:`predict`)."""
        from udmtrain.diffusion import functional as F

        logits = logits_BLV if logits_BLV.dtype == torch.float64 else logits_BLV.float()
        alpha = alpha_B1.to(logits.dtype)
        T, mode = float(self.cfg.temperature), self.temperature_on
        if T == 1.0 or mode == "logits":
            logp = self.posterior_logp(logits / T if T != 1.0 else logits, run, alpha, want)
        else:
            logp = cat.temper(self.posterior_logp(logits, run, alpha, mode), T)
            if mode != want:  # exact Bayes conversion (docs/theory.md §2) of the tempered object
                convert = F.loo_to_denoiser if want == "denoiser" else F.denoiser_to_loo
                logp = convert(logp, run.z_BL, alpha)
        return cat.top_p_filter(logp, self.cfg.top_p)

    def posterior_logp(self, logits_BLV: torch.Tensor, run: SamplingRun, alpha_B1: torch.Tensor,
                       want: PredictionKind) -> torch.Tensor:
        """Untempered ``log D`` or ``log Lo`` from the parameterization (whatever the net predicts)."""
        if want == "loo":
            if not self.supports_loo:
                raise ValueError(f"the LOO posterior does not exist for process {_name(self.process)!r} "
                                 "(it does not declare 'loo_posterior')")
            return self.param.loo_logp(logits_BLV, run.z_BL, alpha_B1, run.noise_BL)
        return self.param.denoiser_logp(logits_BLV, run.z_BL, alpha_B1, run.noise_BL)

    def clamp(self, run: SamplingRun) -> None:
        """Write the prompt (or prefix) into the state. For AUDM its noise token is set to a different
        token (``(x + 1) mod V``), which marks it certainly clean (docs/theory.md §1.3), so an exact posterior
        conditions on it exactly; for the masked process clean tokens are frozen anyway; for the
        uniform process clamping is the usual heuristic (the prompt is seen as a noisy draw). The
        training objective keeps prompt positions clean the same way, so the network has seen them so."""
        if run.prompt_mask_BL is not None:
            mask, tokens = run.prompt_mask_BL, run.prefix_BL
            run.z_BL = torch.where(mask, tokens, run.z_BL)
            if run.noise_BL is not None:
                run.noise_BL = torch.where(mask, (tokens + 1) % self.vocab_size, run.noise_BL)
            return
        p = run.prefix_len
        if p == 0:
            return
        run.z_BL[:, :p] = run.prefix_BL[:, :p]
        if run.noise_BL is not None:
            run.noise_BL[:, :p] = (run.prefix_BL[:, :p] + 1) % self.vocab_size

    def record(self, run: SamplingRun) -> None:
        """Clamp the prefix and append the state to the trajectory (called after every step)."""
        self.clamp(run)
        if run.trajectory is not None:
            run.trajectory.append(run.z_BL.detach().cpu().clone())

    # ------------------------------------------------------------------ validation
    @staticmethod
    def _device(network: Any, generator: torch.Generator, prefix_BL: torch.Tensor | None) -> torch.device:
        if prefix_BL is not None:
            return prefix_BL.device
        params = getattr(network, "parameters", None)
        if callable(params):
            for p in params():
                return p.device
        return generator.device

    def _check_prefix(self, prefix_BL, prefix_len, batch_size, seq_len, device,
                      mask_BL: torch.Tensor | None = None) -> torch.Tensor | None:
        """``prefix_BL`` on ``device`` after checking its shape and that its clamped tokens (the first
        ``prefix_len``, or those under ``mask_BL``) are real tokens; None without a prefix."""
        if not 0 <= prefix_len <= seq_len:
            raise ValueError(f"prefix_len must be in [0, seq_len={seq_len}], got {prefix_len}")
        if prefix_len == 0:
            return None
        if prefix_BL is None:
            raise ValueError(f"prefix_len={prefix_len} but no prefix_BL was given")
        if prefix_BL.dim() != 2 or prefix_BL.shape[0] != batch_size or prefix_BL.shape[1] < prefix_len:
            raise ValueError(f"prefix_BL must be [batch_size={batch_size}, >= prefix_len={prefix_len}], "
                             f"got {tuple(prefix_BL.shape)}")
        prefix = prefix_BL.to(device=device, dtype=torch.long)
        head = prefix[:, :prefix_len] if mask_BL is None else prefix[mask_BL]
        if head.numel() and (bool((head < 0).any()) or bool((head >= self.vocab_size).any())):
            raise ValueError(f"prefix tokens must be real tokens in [0, {self.vocab_size}), got range "
                             f"[{int(head.min())}, {int(head.max())}]")
        return prefix

    @staticmethod
    def _check_prompt_mask(mask_BL, prefix_BL, prefix_len, batch_size, seq_len, device) -> torch.Tensor | None:
        """The prompt mask as bool ``[B, L]`` on ``device`` (None when not given), after checking it
        comes with ``[B, L]`` tokens and no ``prefix_len``."""
        if mask_BL is None:
            return None
        if prefix_len:
            raise ValueError(f"give either prefix_len ({prefix_len}) or prompt_mask_BL, not both")
        if prefix_BL is None:
            raise ValueError("prompt_mask_BL was given without the prompt tokens prefix_BL [B, L]")
        want = (batch_size, seq_len)
        if tuple(mask_BL.shape) != want or tuple(prefix_BL.shape) != want:
            raise ValueError(f"prompt_mask_BL and prefix_BL must both be [batch_size, seq_len] = {list(want)}, "
                             f"got {list(mask_BL.shape)} and {list(prefix_BL.shape)}")
        return mask_BL.to(device=device, dtype=torch.bool)
