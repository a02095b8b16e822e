"""TrainState: the loop's own resumable state (docs/design.md C13), stored per rank in every checkpoint.

``step``, ``tokens_seen``, ``num_nonfinite``, ``total_skipped`` and ``ema`` are identical on every
rank; ``data_cursor`` and ``rng`` are this rank's own (the data loader's position and the RNG
snapshot taken at save time), which is why a resume needs the same world size.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

FORMAT_VERSION = 1
"""Version of the TrainState dict layout; bump and add a migration in checkpoint.py on change."""


@dataclass
class TrainState:
    """Mutable counters of the train loop plus the per-rank state a bit-exact resume needs."""

    step: int = 0
    """Optimizer steps completed."""
    tokens_seen: int = 0
    """Valid (non-padding) training tokens consumed by all ranks together."""
    num_nonfinite: int = 0
    """Consecutive steps whose loss or grad norm was not finite (reset by a finite step)."""
    total_skipped: int = 0
    """Steps skipped for a non-finite loss/grad norm over the whole run."""
    data_cursor: dict[str, Any] = field(default_factory=dict)
    """This rank's data loader ``state_dict()``."""
    ema: dict[str, Any] | None = None
    """EMA ``state_dict()`` (owned by udmtrain.models.ema), or None without EMA."""
    rng: dict[str, Any] | None = None
    """This rank's RNG snapshot (``udmtrain.utils.rng.capture_rng_state``) taken at save time."""

    def state_dict(self) -> dict[str, Any]:
        """A deep copy of every field plus ``format_version``."""
        out = {name: copy.deepcopy(getattr(self, name)) for name in self.__dataclass_fields__}
        out["format_version"] = FORMAT_VERSION
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore every field; unknown keys or a newer ``format_version`` raise ValueError."""
        version = state.get("format_version", FORMAT_VERSION)
        if version > FORMAT_VERSION:
            raise ValueError(
                f"train state format_version {version} is newer than this udmtrain ({FORMAT_VERSION}); "
                "upgrade udmtrain to resume this checkpoint"
            )
        unknown = set(state) - set(self.__dataclass_fields__) - {"format_version"}
        if unknown:
            raise ValueError(f"train state has unknown keys {sorted(unknown)}")
        for name in self.__dataclass_fields__:
            if name in state:
                setattr(self, name, copy.deepcopy(state[name]))
