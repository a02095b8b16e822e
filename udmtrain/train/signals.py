"""Graceful exit on SIGTERM/SIGINT: finish the current step, save, exit cleanly.

A signal only sets a flag; the trainer polls ``should_exit()`` after each optimizer step. The poll
all-reduces the flag (MAX) so every rank stops at the same step even when the scheduler signalled
only some of them. A second SIGINT while the flag is set raises KeyboardInterrupt (the user insists).
Previous handlers are restored on exit from the ``with`` block.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

from udmtrain.utils.dist import any_rank


class GracefulExit:
    """Context manager: ``with GracefulExit() as stop: ... if stop.should_exit(): save; break``."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> None:
        self.signals = signals
        self.requested = False
        """Set by the handler on this rank."""
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested, self.signum = True, signum

    def __enter__(self) -> GracefulExit:
        # signal.signal only works in the main thread; elsewhere (e.g. some test runners) we just poll.
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def should_exit(self) -> bool:
        """True on every rank if any rank received a signal (collective when a group exists)."""
        self.requested = any_rank(self.requested)
        return self.requested
