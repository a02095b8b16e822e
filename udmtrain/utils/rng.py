"""Capture and restore every global RNG a training step may touch (per rank).

Python ``random``, NumPy's legacy global generator (if NumPy is installed), torch's CPU generator and,
when CUDA is initialised, every CUDA device's generator. Restoring a captured state makes the next
draws bit-identical, which is what an exact resume needs for dropout and any unseeded sampling.
"""

from __future__ import annotations

import random
from typing import Any

import torch

try:  # numpy is a dependency of deepspeed/webdataset, but the RNG helper does not require it
    import numpy as np
except ImportError:  # pragma: no cover
    np = None


def capture_rng_state() -> dict[str, Any]:
    """A snapshot ``{"python", "numpy", "torch", "cuda"}`` of this process's RNGs.

    Only tensors, numbers, strings, lists and tuples, so that a checkpoint holding it loads with
    ``torch.load(weights_only=True)`` (NumPy's key array is stored as a list of ints).
    """
    return {
        "python": random.getstate(),
        "numpy": _plain_numpy_state(np.random.get_state()) if np is not None else None,
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of ``capture_rng_state``; a missing entry (e.g. CUDA in a CPU checkpoint) is skipped."""
    random.setstate(_as_python_state(state["python"]))
    if np is not None and state.get("numpy") is not None:
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_python_state(state: Any) -> tuple:
    # random.setstate needs tuples; a JSON/YAML round trip would have produced lists.
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


def _plain_numpy_state(state: tuple) -> list:
    """``np.random.get_state()`` with the uint32 key array as a list of ints (same values)."""
    name, keys, pos, has_gauss, cached = state
    return [str(name), [int(k) for k in keys], int(pos), int(has_gauss), float(cached)]
