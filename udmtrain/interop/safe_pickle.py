"""Read a foreign PyTorch checkpoint without importing or executing anything it names.

A Lightning checkpoint of the reference code pickles an OmegaConf ``DictConfig`` and a class of the
reference code next to the weights, so ``torch.load(weights_only=True)`` refuses it, and ordinary
unpickling would import that code (and run whatever ``__reduce__`` it names). ``safe_load`` reads the
zip container with torch's own tensor reader but resolves globals with ``SafeUnpickler.find_class``:

* an allow-list of already imported objects that only rebuild tensors and plain containers
  (``torch._utils._rebuild_tensor_v2``, ``_rebuild_parameter``, ``collections.OrderedDict``; torch
  itself maps ``torch.*Storage`` names to storage dtypes before asking us);
* every other ``module.name`` becomes an inert ``Placeholder`` subclass that records the name and keeps
  what the pickle hands it (constructor arguments, ``__setstate__`` state, set/appended items), so the
  data of e.g. a ``DictConfig`` (its ``_content``) survives without omegaconf installed.

Nothing is imported: the allow-list maps names to objects, never to ``importlib`` look-ups.
``plain(obj)`` then turns OmegaConf-shaped placeholders into plain dicts / lists / scalars.
"""

from __future__ import annotations

import collections
import os
import pickle
import types
import zipfile
from typing import Any

import torch
import torch._utils

from udmtrain.interop.errors import InteropError


class UnsafeCheckpointError(InteropError):
    """A file that cannot be read safely (not a torch zip archive, or an unreadable pickle)."""


class Placeholder:
    """Inert stand-in for a global the checkpoint names; subclasses carry ``ref_module`` / ``ref_name``.

    Instances keep ``args`` (constructor / ``__new__`` / REDUCE arguments), ``state`` (``__setstate__``),
    ``items`` (``obj[k] = v`` from SETITEMS) and ``list_items`` (APPENDS); no method runs foreign code.
    """

    ref_module = ""
    ref_name = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> Placeholder:
        self = object.__new__(cls)
        self.args, self.kwargs, self.state = args, kwargs, None
        self.items, self.list_items = {}, []
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # REDUCE calls cls(*args); __new__ kept them
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.items[key] = value

    def append(self, value: Any) -> None:
        self.list_items.append(value)

    def extend(self, values: Any) -> None:
        self.list_items.extend(values)

    @classmethod
    def qualname(cls) -> str:
        """``module.name`` of the global this placeholder stands for."""
        return f"{cls.ref_module}.{cls.ref_name}"

    def __repr__(self) -> str:
        return f"<placeholder {self.qualname()}>"


ALLOWED: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
}
"""The only globals resolved to real objects: tensor rebuilders and an ordered dict."""


class SafeUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose globals are the allow-list or inert placeholders (never an import)."""

    placeholders: dict[tuple[str, str], type] = {}

    def find_class(self, module: str, name: str) -> Any:
        key = (module, name)
        if key in ALLOWED:
            return ALLOWED[key]
        if key not in self.placeholders:
            cls_name = name if name.isidentifier() else "Global"
            self.placeholders[key] = type(cls_name, (Placeholder,), {"ref_module": module, "ref_name": name,
                                                                    "__module__": __name__})
        return self.placeholders[key]


def _refuse_legacy(*args: Any, **kwargs: Any) -> Any:
    """torch reads legacy (non-zip) files with ``pickle_module.load``; ``safe_load`` refuses them first."""
    raise UnsafeCheckpointError("legacy (non-zip) torch files are not read by the restricted unpickler")


_pickle_module = types.ModuleType("udmtrain_safe_pickle")
_pickle_module.Unpickler = SafeUnpickler  # torch subclasses it and sets persistent_load (the tensor data)
_pickle_module.load = _refuse_legacy


def safe_load(path: str | os.PathLike) -> Any:
    """The object pickled in the torch zip archive ``path`` (tensors on CPU, foreign globals as placeholders).

    Raises ``UnsafeCheckpointError`` for a file that is not a torch zip archive (the legacy format is
    not read) and ``FileNotFoundError`` for a missing file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    if not zipfile.is_zipfile(path):
        raise UnsafeCheckpointError(f"{path}: not a torch zip archive (torch.save since PyTorch 1.6); the "
                                    "legacy format is not read; re-save it with a recent torch.save")
    try:
        return torch.load(path, map_location="cpu", pickle_module=_pickle_module, weights_only=False)
    except (pickle.UnpicklingError, RuntimeError, TypeError, AttributeError) as err:
        raise UnsafeCheckpointError(f"{path}: cannot be read with the restricted unpickler "
                                    f"({type(err).__name__}: {err})") from err


def plain(obj: Any) -> Any:
    """Placeholders of OmegaConf containers/nodes -> plain dicts, lists and scalars (recursively).

    A ``DictConfig`` / ``ListConfig`` keeps its children in ``state['_content']``, a value node its
    value in ``state['_val']``; a pickled ``dict``/``list`` subclass keeps them in ``items`` /
    ``list_items``. Any other placeholder is returned as is (the caller decides whether it matters).
    """
    if isinstance(obj, Placeholder):
        state = obj.state
        if isinstance(state, dict) and "_content" in state:
            return plain(state["_content"])
        if isinstance(state, dict) and "_val" in state:
            return plain(state["_val"])
        if obj.items and not obj.list_items:
            return {plain(k): plain(v) for k, v in obj.items.items()}
        if obj.list_items and not obj.items:
            return [plain(v) for v in obj.list_items]
        return obj
    if isinstance(obj, dict):
        return {plain(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(plain(v) for v in obj) if isinstance(obj, list) else tuple(plain(v) for v in obj)
    return obj
