"""Forward noise processes ``q_t(z | x)``, all factorised over positions (SPEC 1.1-1.3).

Shape legend: ``x0_BL``, ``xt_BL``, ``noise_BL`` LongTensor ``[B, L]``; ``alpha_B1`` float ``[B, 1]``.
Randomness always comes from the ``generator`` argument (``None`` = torch's default generator); it
must live on the device of the tensors.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor

from udmtrain.registry import PROCESS


class Noised(NamedTuple):
    """A noisy batch: ``xt_BL`` and, for the absorbing-uniform process, its noise tokens ``noise_BL``."""

    xt_BL: Tensor
    noise_BL: Tensor | None = None


class ForwardProcess(abc.ABC):
    """A forward corruption process over ``num_states`` token ids.

    Attributes: ``vocab_size`` (the tokenizer's V), ``num_states`` (network head width),
    ``mask_id`` (``None`` unless masked), ``uses_noise_tokens`` (AUDM), ``natural_nelbo`` (registry
    name of the loss that is this process's NELBO: what the objective logs as ``nll``).
    """

    requires: ClassVar[Mapping[str, frozenset[str]]] = {}
    mask_id: int | None = None
    uses_noise_tokens: bool = False
    natural_nelbo: ClassVar[str]
    supports_loo: ClassVar[bool] = False

    def __init__(self, cfg, vocab_size: int) -> None:
        if int(vocab_size) < 2:
            raise ValueError(f"process {type(self).__name__}: vocab_size must be >= 2, got {vocab_size}")
        self.cfg = cfg
        self.vocab_size = int(vocab_size)

    @property
    def num_states(self) -> int:
        """Width of the network's output (and of every log-prob tensor of this process)."""
        return self.vocab_size

    @abc.abstractmethod
    def corrupt(self, x0_BL: Tensor, alpha_B1: Tensor, generator: torch.Generator | None) -> Noised:
        """Draw ``z_t ~ q_t(. | x0)``; each token stays clean with probability ``alpha``."""

    @abc.abstractmethod
    def prior(self, batch_size: int, seq_len: int, generator: torch.Generator | None,
              device: torch.device | str = "cpu") -> Noised:
        """Draw ``z_1`` from the prior (``alpha_1 = eps`` residue ignored, SPEC 1)."""

    def known_clean(self, xt_BL: Tensor, noise_BL: Tensor | None = None) -> Tensor | None:
        """Bool ``[B, L]``: positions certainly clean given ``z_t`` (carry-over), or ``None`` if none are."""
        return None

    # shared helpers --------------------------------------------------------------------
    @staticmethod
    def _keep(x0_BL: Tensor, alpha_B1: Tensor, generator) -> Tensor:
        """Bool ``[B, L]``: token stays clean (``u < alpha``, u ~ U[0,1) in float64)."""
        u = torch.rand(x0_BL.shape, generator=generator, device=x0_BL.device, dtype=torch.float64)
        return u < alpha_B1.to(device=x0_BL.device, dtype=torch.float64)

    def _uniform_tokens(self, shape, generator, device) -> Tensor:
        return torch.randint(0, self.vocab_size, tuple(shape), generator=generator, device=device)


@PROCESS.register("masked")
class MaskedProcess(ForwardProcess):
    """Absorbing process: ``q_t(z | x) = alpha e_x + (1 - alpha) e_m`` with mask id ``m = V`` (SPEC 1.1)."""

    natural_nelbo = "mdlm_nelbo"

    @dataclass(kw_only=True, frozen=True)
    class Config:
        pass

    def __init__(self, cfg: Config | None = None, vocab_size: int = 0) -> None:
        super().__init__(cfg if cfg is not None else self.Config(), vocab_size)
        self.mask_id = self.vocab_size

    @property
    def num_states(self) -> int:
        return self.vocab_size + 1

    def known_clean(self, xt_BL, noise_BL=None):
        """Unmasked positions are clean (``z != m``)."""
        return xt_BL != self.mask_id

    def corrupt(self, x0_BL, alpha_B1, generator) -> Noised:
        keep = self._keep(x0_BL, alpha_B1, generator)
        return Noised(torch.where(keep, x0_BL, torch.full_like(x0_BL, self.mask_id)))

    def prior(self, batch_size, seq_len, generator, device="cpu") -> Noised:
        return Noised(torch.full((batch_size, seq_len), self.mask_id, dtype=torch.long, device=device))


@PROCESS.register("uniform")
class UniformProcess(ForwardProcess):
    """Uniform process: ``q_t(z | x) = alpha e_x + (1 - alpha)/V 1`` over exactly V states (SPEC 1.2, 10.5)."""

    natural_nelbo = "plugin_nelbo"
    supports_loo = True

    @dataclass(kw_only=True, frozen=True)
    class Config:
        pass

    def __init__(self, cfg: Config | None = None, vocab_size: int = 0) -> None:
        super().__init__(cfg if cfg is not None else self.Config(), vocab_size)

    def corrupt(self, x0_BL, alpha_B1, generator) -> Noised:
        keep = self._keep(x0_BL, alpha_B1, generator)
        # with probability 1 - alpha resample uniformly (the draw may equal x)
        return Noised(torch.where(keep, x0_BL, self._uniform_tokens(x0_BL.shape, generator, x0_BL.device)))

    def prior(self, batch_size, seq_len, generator, device="cpu") -> Noised:
        return Noised(self._uniform_tokens((batch_size, seq_len), generator, device))


@PROCESS.register("absorbing_uniform")
class AbsorbingUniformProcess(ForwardProcess):
    """AUDM lift of the uniform process (SPEC 1.3): ``n ~ U^L`` fresh per call, ``z = n`` w.p. ``1 - alpha``.

    The ``(x, z_t)`` marginal equals the uniform process exactly; ``n`` is returned (and must be
    passed to the network) explicitly, never as a tensor attribute (SPEC 10.12).
    """

    uses_noise_tokens = True
    natural_nelbo = "audm_nelbo"

    @dataclass(kw_only=True, frozen=True)
    class Config:
        pass

    def __init__(self, cfg: Config | None = None, vocab_size: int = 0) -> None:
        super().__init__(cfg if cfg is not None else self.Config(), vocab_size)

    def known_clean(self, xt_BL, noise_BL=None):
        """``z != n`` implies clean (SPEC 1.3 carry-over)."""
        if noise_BL is None:
            raise ValueError("the absorbing_uniform process needs its noise tokens noise_BL (got None)")
        return xt_BL != noise_BL

    def corrupt(self, x0_BL, alpha_B1, generator) -> Noised:
        noise = self._uniform_tokens(x0_BL.shape, generator, x0_BL.device)
        keep = self._keep(x0_BL, alpha_B1, generator)
        return Noised(torch.where(keep, x0_BL, noise), noise)

    def prior(self, batch_size, seq_len, generator, device="cpu") -> Noised:
        noise = self._uniform_tokens((batch_size, seq_len), generator, device)
        return Noised(noise.clone(), noise)
