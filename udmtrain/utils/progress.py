"""One progress display for every long-running tool: a tqdm bar on a terminal, status lines otherwise.

    with progress(total=256, desc="sampling", unit="step") as bar:
        for _ in range(256):
            ...
            bar.update()

On a terminal (stderr is a TTY) this is a tqdm bar. Anywhere else (a log file, CI, a pipe) it prints
one line at most every ``interval`` seconds (``UDMTRAIN_PROGRESS_INTERVAL``, default 10) plus a final
line, because tqdm's carriage-return redraws turn a log into one unreadable line::

    udmtrain: sampling 96/256 step (37.5%) | 12.3 step/s | elapsed 0:00:08 | eta 0:00:13

Only global rank 0 shows anything (other ranks get a silent bar), so callers never test the rank.
Library code does not print: it takes an optional ``on_progress(n)`` callback (``bar.update`` fits),
and the tools own the bar. ``counting(fn, bar.update)`` counts the calls of a function (e.g. network
evaluations of a sampler) without touching the code that calls it.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TextIO, TypeVar

T = TypeVar("T")


def format_hms(seconds: float) -> str:
    """``H:MM:SS`` of a non-negative duration (rounded to whole seconds)."""
    seconds = int(round(max(0.0, seconds)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _rank0() -> bool:
    from udmtrain.utils.dist import get_rank

    return get_rank() == 0


class Progress:
    """A progress display; use ``progress(...)`` to make one. ``update(n)`` adds ``n`` units done.

    ``total=None`` shows count and rate without a percentage or ETA. ``close()`` (or leaving the
    ``with`` block) prints the final line: count, rate and elapsed time.
    """

    def __init__(self, total: int | None, desc: str, unit: str = "it", *, stream: TextIO | None = None,
                 interval: float | None = None, enabled: bool | None = None, tty: bool | None = None) -> None:
        self.total = None if total is None else int(total)
        self.desc, self.unit = desc, unit
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = _rank0() if enabled is None else bool(enabled)
        if interval is None:
            interval = float(os.environ.get("UDMTRAIN_PROGRESS_INTERVAL", "10"))
        self.interval = float(interval)
        self.count = 0
        self._t0 = self._last = time.perf_counter()
        self._closed = False
        self._bar = None
        is_tty = tty if tty is not None else bool(getattr(self.stream, "isatty", lambda: False)())
        if self.enabled and is_tty:
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, desc=desc, unit=unit, file=self.stream, mininterval=0.5,
                             dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        """``n`` more units done; on a non-terminal a line is printed when ``interval`` has passed."""
        self.count += int(n)
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.perf_counter()
        if now - self._last >= self.interval and not (self.total and self.count >= self.total):  # close() says it
            self._last = now
            print(self.line(now), file=self.stream, flush=True)

    def line(self, now: float | None = None, final: bool = False) -> str:
        """The status line: ``udmtrain: DESC 96/256 step (37.5%) | 12.3 step/s | elapsed .. | eta ..``."""
        elapsed = (now if now is not None else time.perf_counter()) - self._t0
        rate = self.count / elapsed if elapsed > 0 else 0.0
        done = f"{self.count}/{self.total} {self.unit}" if self.total else f"{self.count} {self.unit}"
        if self.total:
            done += f" ({100.0 * self.count / self.total:.1f}%)"
        parts = [f"udmtrain: {self.desc} {done}", f"{rate:.3g} {self.unit}/s" if rate >= 1 or rate == 0
                 else f"{1 / rate:.3g} s/{self.unit}", f"elapsed {format_hms(elapsed)}"]
        if final:
            parts[0] += " done"
        elif self.total and rate > 0:
            parts.append(f"eta {format_hms(max(0, self.total - self.count) / rate)}")
        return " | ".join(parts)

    def wrap(self, items: Iterable[T]) -> Iterator[T]:
        """Yield ``items``, counting one unit per item."""
        for item in items:
            yield item
            self.update(1)

    def close(self) -> None:
        """Finish the display (idempotent): close the bar, or print the final line."""
        if self._closed:
            return
        self._closed = True
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        else:
            print(self.line(final=True), file=self.stream, flush=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def progress(total: int | None, desc: str, unit: str = "it", **kwargs: Any) -> Progress:
    """A ``Progress`` for ``total`` units (None: unknown). Keyword arguments as ``Progress``:
    ``stream`` (default stderr), ``interval`` (seconds between lines off a terminal), ``enabled``
    (default: global rank 0), ``tty`` (force the bar on/off; default: ``stream.isatty()``)."""
    return Progress(total, desc, unit, **kwargs)


def counting(fn: Callable[..., T], on_call: Callable[[int], None]) -> Callable[..., T]:
    """``fn`` that also calls ``on_call(1)`` after each call (e.g. a sampler's network: one unit per
    network evaluation). Attributes of ``fn`` stay reachable through the wrapper."""

    class _Counted:
        def __call__(self, *args: Any, **kwargs: Any) -> T:
            out = fn(*args, **kwargs)
            on_call(1)
            return out

        def __getattr__(self, name: str) -> Any:
            return getattr(fn, name)

    return _Counted()
