"""The pure-torch pieces of a run, built from a validated recipe (no distributed state, no I/O).

``build_components(cfg, vocab_size)`` instantiates the registered process, schedule,
parameterization, loss, objective, model and sampler; ``NetworkCall`` adapts the engine or a bare
module to the objective's network signature under the recipe's autocast.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable

import torch

from udmtrain.registry import LOSS, MODEL, PARAMETERIZATION, PROCESS, SAMPLER, SCHEDULE


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
    absorbing-uniform processes, V + 1 for the masked one, docs/theory.md §10.5).
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
    objective = DiffusionObjective(schedule, process, param, loss)
    components = Components(model=model, objective=objective, process=process, schedule=schedule,
                            parameterization=param, loss=loss)
    if with_sampler and cfg.sampler is not None:
        components.sampler = build_sampler(cfg.sampler, components)
    return components


def build_sampler(sampler_spec: Any, components: Components) -> Any:
    """The one way to build a sampler: ``sampler_spec`` (a recipe's ``sampler`` section: ``.name``,
    ``.cfg``) on the process / schedule / parameterization of ``components``, told by the model
    whether the network uses its time input (``model.time_conditioning``; a model that does not say
    is assumed to use it, which only disables a prediction cache that would be exact only without it).
    """
    return SAMPLER.build(sampler_spec.name, sampler_spec.cfg, schedule=components.schedule,
                         process=components.process, parameterization=components.parameterization,
                         time_conditioning=bool(getattr(components.model, "time_conditioning", True)))


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


class NetworkCall:
    """Adapts the engine (or a bare module) to the objective's network signature under autocast.

    Keyword arguments (``doc_ids_BL`` with ``data.document_attention``) pass through to the module.
    """

    def __init__(self, module: Callable, precision: str, device: torch.device) -> None:
        self.module, self.precision, self.device = module, precision, device

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        with autocast_context(self.precision, self.device):
            return self.module(*args, **kwargs)
