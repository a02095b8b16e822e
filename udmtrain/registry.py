"""One registry per component family, filled by decorators, imported lazily.

A recipe picks a component by ``name:`` once, at build time (docs/design.md C3/C4)::

    from udmtrain.registry import SCHEDULE

    @SCHEDULE.register("loglinear")
    class LogLinearSchedule(Schedule):
        @dataclass(kw_only=True, frozen=True)
        class Config:
            eps: float = 1e-3

        requires = {}          # e.g. {"process": frozenset({"uniform"})}

        def __init__(self, cfg: Config) -> None: ...

``SCHEDULE.get("loglinear")`` imports the family's modules (``FAMILY_MODULES``) on first use, so
``import udmtrain`` stays cheap. That import table is the single sanctioned "upward" edge of the
layering (docs/design.md §4). An entry ``"package.*"`` means every module of that package, so a new
component is one new file in its family's package (no table or ``__init__`` to edit).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import pkgutil
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

T = TypeVar("T")

# family -> modules whose import registers that family's components.
FAMILY_MODULES: dict[str, tuple[str, ...]] = {
    "model": ("udmtrain.models.*",),
    "process": ("udmtrain.diffusion.*",),
    "schedule": ("udmtrain.diffusion.*",),
    "parameterization": ("udmtrain.diffusion.*",),
    "loss": ("udmtrain.diffusion.*",),
    "sampler": ("udmtrain.diffusion.samplers.*",),
    "tokenizer": ("udmtrain.data.tokenizers",),
    "optimizer": ("udmtrain.engine.optim",),
    "lr_schedule": ("udmtrain.engine.optim",),
}


def expand_modules(entry: str) -> list[str]:
    """``"pkg.*"`` -> ``pkg`` and every module directly inside it (sorted); any other entry -> itself."""
    if not entry.endswith(".*"):
        return [entry]
    package = importlib.import_module(entry[:-2])
    return [package.__name__] + sorted(f"{package.__name__}.{m.name}" for m in pkgutil.iter_modules(package.__path__))


class RegistryError(Exception):
    """A programming error in registration (duplicate name, missing Config)."""


class UnknownComponentError(KeyError):
    """A name that is not registered in a family; carries did-you-mean suggestions."""

    def __init__(self, family: str, name: str, suggestions: list[str], registered: list[str]):
        self.family, self.name = family, name
        self.suggestions, self.registered = suggestions, registered
        super().__init__(self.message())

    def message(self) -> str:
        text = f"{self.name!r} is not a registered {self.family}"
        if self.suggestions:
            text += f"; did you mean {self.suggestions[0]!r}?"
        return text

    def __str__(self) -> str:
        return f"{self.message()} (registered: {', '.join(self.registered) or 'none'})"


class Registry(Generic[T]):
    """Name -> class table for one component family.

    Every registered class must define a nested dataclass ``Config`` (its typed settings) and may
    define ``requires: Mapping[str, frozenset[str]]`` naming the sibling components it works with
    (``{"process": frozenset({"uniform"})}``), which the recipe validator checks before any build.
    """

    def __init__(self, family: str, base: type | None = None):
        self.family = family
        self.base = base
        self._classes: dict[str, type] = {}
        self._imported = False

    def register(self, name: str) -> Callable[[type], type]:
        """Class decorator: register ``cls`` under ``name`` (snake_case, as written in YAML)."""

        def decorator(cls: type) -> type:
            if name in self._classes and self._classes[name] is not cls:
                raise RegistryError(
                    f"{self.family} {name!r} is registered twice: "
                    f"{self._classes[name].__qualname__} and {cls.__qualname__}"
                )
            if self.base is not None and not issubclass(cls, self.base):
                raise RegistryError(f"{cls.__qualname__} must subclass {self.base.__qualname__}")
            config = getattr(cls, "Config", None)
            if config is None or not dataclasses.is_dataclass(config):
                raise RegistryError(f"{cls.__qualname__} needs a nested dataclass 'Config'")
            cls.registry_name = name
            self._classes[name] = cls
            return cls

        return decorator

    def _import_family(self) -> None:
        if self._imported:
            return
        self._imported = True
        for module in FAMILY_MODULES.get(self.family, ()):
            for name in expand_modules(module):
                importlib.import_module(name)

    def names(self) -> list[str]:
        """Sorted registered names (imports the family's modules first)."""
        self._import_family()
        return sorted(self._classes)

    def __contains__(self, name: object) -> bool:
        self._import_family()
        return name in self._classes

    def get(self, name: str) -> type:
        """The class registered as ``name``; ``UnknownComponentError`` with suggestions otherwise."""
        self._import_family()
        try:
            return self._classes[name]
        except KeyError:
            names = sorted(self._classes)
            close = difflib.get_close_matches(str(name), names, n=3, cutoff=0.5)
            raise UnknownComponentError(self.family, str(name), close, names) from None

    def build(self, name: str, cfg: Any | None = None, **deps: Any) -> T:
        """Instantiate ``name`` from its ``Config`` instance (defaults if None) and runtime deps."""
        cls = self.get(name)
        return cls(cfg if cfg is not None else cls.Config(), **deps)

    def requirements(self, name: str) -> Mapping[str, frozenset[str]]:
        """What ``name`` needs from sibling families: ``{family: allowed names}``."""
        return getattr(self.get(name), "requires", {}) or {}


MODEL: Registry = Registry("model")
PROCESS: Registry = Registry("process")
SCHEDULE: Registry = Registry("schedule")
PARAMETERIZATION: Registry = Registry("parameterization")
LOSS: Registry = Registry("loss")
SAMPLER: Registry = Registry("sampler")
TOKENIZER: Registry = Registry("tokenizer")
OPTIMIZER: Registry = Registry("optimizer")
LR_SCHEDULE: Registry = Registry("lr_schedule")

REGISTRIES: dict[str, Registry] = {
    r.family: r
    for r in (MODEL, PROCESS, SCHEDULE, PARAMETERIZATION, LOSS, SAMPLER, TOKENIZER, OPTIMIZER, LR_SCHEDULE)
}


def registry(family: str) -> Registry:
    """The registry of ``family`` (``KeyError`` listing the families if unknown)."""
    try:
        return REGISTRIES[family]
    except KeyError:
        raise KeyError(f"unknown component family {family!r}; families: {', '.join(REGISTRIES)}") from None
