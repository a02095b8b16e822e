"""Per-token diffusion training losses (docs/theory.md §3). Each asks the parameterization for the object it needs
(plug-in NELBO: the LOO; all others: the denoiser), so parameterization and objective are independent.

Shape legend: ``logits_BLV`` float ``[B, L, V]``; ``x0_BL`` LongTensor ``[B, L]``; ``noised`` a
``Noised(xt_BL, noise_BL)``; ``alpha_B1``, ``dalpha_B1`` float ``[B, 1]``; output ``[B, L]`` float32.
The NELBO losses include their time weighting, so ``E_t[mean_l loss]`` estimates the NELBO per token.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from udmtrain.diffusion import functional as F
from udmtrain.diffusion.parameterization import Parameterization
from udmtrain.diffusion.process import ForwardProcess, Noised
from udmtrain.registry import LOSS

NELBO_NAMES = ("plugin_nelbo", "max_coupling_nelbo", "mdlm_nelbo", "audm_nelbo")


class DiffusionLoss(abc.ABC):
    """A per-token loss ``per_token(param, logits, x0, noised, alpha, dalpha) -> [B, L]``.

    ``is_nelbo``: the loss is a continuous-time NELBO integrand (its token mean is a bound on the NLL).
    """

    requires: ClassVar[Mapping[str, frozenset[str]]] = {}
    is_nelbo: ClassVar[bool] = True

    def __init__(self, cfg, process: ForwardProcess) -> None:
        self.cfg = cfg
        self.process = process
        allowed = self.requires.get("process")
        name = getattr(process, "registry_name", None)
        if allowed is not None and name is not None and name not in allowed:
            raise ValueError(
                f"loss {getattr(self, 'registry_name', type(self).__name__)} needs process "
                f"{' or '.join(sorted(allowed))}, got {name}; change `process.name` or `loss.name`"
            )

    @abc.abstractmethod
    def per_token(self, param: Parameterization, logits_BLV: Tensor, x0_BL: Tensor, noised: Noised,
                  alpha_B1: Tensor, dalpha_B1: Tensor) -> Tensor:
        """Loss per token ``[B, L]`` (the caller masks invalid positions and averages)."""


@LOSS.register("plugin_nelbo")
class PluginNelboLoss(DiffusionLoss):
    """UDLM plug-in NELBO (docs/theory.md §3.1) on the LOO prediction; its minimiser is the LOO, not the denoiser."""

    requires = {"process": frozenset({"uniform"})}

    @dataclass(kw_only=True, frozen=True)
    class Config:
        pass

    def __init__(self, cfg: Config | None = None, process: ForwardProcess | None = None) -> None:
        super().__init__(cfg if cfg is not None else self.Config(), process)

    def per_token(self, param, logits_BLV, x0_BL, noised, alpha_B1, dalpha_B1):
        loo = param.loo_logp(logits_BLV, noised.xt_BL, alpha_B1, noised.noise_BL)
        return F.udlm_nelbo(loo, x0_BL, noised.xt_BL, alpha_B1, dalpha_B1)


@LOSS.register("max_coupling_nelbo")
class MaxCouplingNelboLoss(DiffusionLoss):
    """Max-coupling NELBO (docs/theory.md §3.3) on the denoiser; strictly looser than the plug-in NELBO at optimum."""

    requires = {"process": frozenset({"uniform"})}

    @dataclass(kw_only=True, frozen=True)
    class Config:
        pass

    def __init__(self, cfg: Config | None = None, process: ForwardProcess | None = None) -> None:
        super().__init__(cfg if cfg is not None else self.Config(), process)

    def per_token(self, param, logits_BLV, x0_BL, noised, alpha_B1, dalpha_B1):
        den = param.denoiser_logp(logits_BLV, noised.xt_BL, alpha_B1, noised.noise_BL)
        return F.max_coupling_nelbo(den, x0_BL, noised.xt_BL, alpha_B1, dalpha_B1)


@LOSS.register("mdlm_nelbo")
class MDLMNelboLoss(DiffusionLoss):
    """MDLM NELBO (docs/theory.md §3.4): ``-r_t log D(x | z)`` on masked positions."""

    requires = {"process": frozenset({"masked"})}

    @dataclass(kw_only=True, frozen=True)
    class Config:
        pass

    def __init__(self, cfg: Config | None = None, process: ForwardProcess | None = None) -> None:
        super().__init__(cfg if cfg is not None else self.Config(), process)

    def per_token(self, param, logits_BLV, x0_BL, noised, alpha_B1, dalpha_B1):
        den = param.denoiser_logp(logits_BLV, noised.xt_BL, alpha_B1, noised.noise_BL)
        return F.mdlm_nelbo(den, x0_BL, noised.xt_BL, alpha_B1, dalpha_B1, self.process.mask_id)


@LOSS.register("audm_nelbo")
class AUDMNelboLoss(DiffusionLoss):
    """AUDM NELBO (docs/theory.md §3.5): a masked chain whose per-position mask token is the noise token ``n``."""

    requires = {"process": frozenset({"absorbing_uniform"})}

    @dataclass(kw_only=True, frozen=True)
    class Config:
        pass

    def __init__(self, cfg: Config | None = None, process: ForwardProcess | None = None) -> None:
        super().__init__(cfg if cfg is not None else self.Config(), process)

    def per_token(self, param, logits_BLV, x0_BL, noised, alpha_B1, dalpha_B1):
        if noised.noise_BL is None:
            raise ValueError("audm_nelbo needs the noise tokens (noised.noise_BL is None)")
        den = param.denoiser_logp(logits_BLV, noised.xt_BL, alpha_B1, noised.noise_BL)
        return F.audm_nelbo(den, x0_BL, noised.xt_BL, noised.noise_BL, alpha_B1, dalpha_B1)


@LOSS.register("cross_entropy")
class CrossEntropyLoss(DiffusionLoss):
    """Denoising cross-entropy ``-log D(x0 | z_t)`` on every position, no time weighting (docs/theory.md §3.2).

    Not a bound (``is_nelbo = False``): the logged ``nll`` is the NELBO named by ``bound``; ``auto``
    picks the process's natural NELBO (uniform: ``plugin_nelbo``, as the reference logs for CE-trained
    UDLM; masked: ``mdlm_nelbo``; absorbing_uniform: ``audm_nelbo``).
    """

    is_nelbo = False

    @dataclass(kw_only=True, frozen=True)
    class Config:
        bound: str = "auto"
        """NELBO logged as ``nll``: auto (the process's own) or plugin_nelbo / max_coupling_nelbo /
        mdlm_nelbo / audm_nelbo (must suit the process)."""

        def __post_init__(self) -> None:
            if self.bound not in ("auto", *NELBO_NAMES):
                raise ValueError(
                    f"loss cross_entropy: bound must be 'auto' or one of {NELBO_NAMES}, got {self.bound!r}"
                )

    def __init__(self, cfg: Config | None = None, process: ForwardProcess | None = None) -> None:
        super().__init__(cfg if cfg is not None else self.Config(), process)

    def per_token(self, param, logits_BLV, x0_BL, noised, alpha_B1, dalpha_B1):
        den = param.denoiser_logp(logits_BLV, noised.xt_BL, alpha_B1, noised.noise_BL)
        return F.denoising_cross_entropy(den, x0_BL)


def nelbo_loss_for(loss: DiffusionLoss, process: ForwardProcess) -> DiffusionLoss:
    """The NELBO the objective logs as ``nll`` for ``loss``: itself if it is a NELBO, else its ``bound``
    (``auto`` -> ``process.natural_nelbo``). Raises ``ValueError`` if the bound does not suit the process."""
    if loss.is_nelbo:
        return loss
    name = getattr(loss.cfg, "bound", "auto")
    name = process.natural_nelbo if name == "auto" else name
    cls = LOSS.get(name)
    return cls(cls.Config(), process)
