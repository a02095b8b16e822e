"""Optional dependencies: import on demand with an install hint naming the pip extra."""

from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, extra: str, feature: str) -> ModuleType:
    """Import ``module`` or raise ImportError telling how to install it.

    ``require("flash_attn", extra="gpu", feature="attn_backend: flash")``.
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"{feature} needs the '{module}' package, which is not importable ({err}). "
            f"Install it with: pip install 'udmtrain[{extra}]'"
        ) from err


def available(module: str) -> tuple[bool, str]:
    """(importable, reason) without raising; the reason is logged by the owner module."""
    try:
        importlib.import_module(module)
        return True, f"{module} is installed"
    except ImportError as err:
        return False, f"{module} not importable: {err}"
