"""Generative frontiers: a resumable sweep over sampler settings and its gen-PPL vs entropy plot.

A frontier (SPEC 7, App. A; "compare curves, not points") is one curve per number of steps, each
point a (temperature, top_p) setting, x = mean unigram entropy, y = gen PPL on a log axis; the point
at temperature 1 and top_p 1 (the untempered model) is marked with a star.

The sweep writes one CSV row per setting, appended and flushed as soon as it is computed, so a
killed sweep restarts where it stopped: settings whose key (``key_fields``) already has a row are
skipped. A partially written last line (a crash mid-write) is removed on restart.
"""

from __future__ import annotations

import csv
import io
import itertools
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

KEY_FIELDS = ("steps", "temperature", "top_p")


def grid(temperatures: Sequence[float] = (1.0,), top_ps: Sequence[float] = (1.0,),
         steps: Sequence[int] = (256,)) -> list[dict]:
    """The full cartesian grid as a list of ``{"steps", "temperature", "top_p"}`` settings."""
    return [{"steps": s, "temperature": t, "top_p": p}
            for s, t, p in itertools.product(steps, temperatures, top_ps)]


def _norm(value: Any) -> str:
    """Canonical text of a key value so that ``64``, ``64.0`` and the CSV's ``"64"`` compare equal."""
    try:
        return repr(float(value))
    except (TypeError, ValueError):
        return str(value)


def setting_key(setting: Mapping[str, Any], key_fields: Sequence[str] = KEY_FIELDS) -> tuple[str, ...]:
    """The identity of a setting in the CSV."""
    missing = [k for k in key_fields if k not in setting]
    if missing:
        raise KeyError(f"sweep setting {dict(setting)} lacks the key field(s) {missing}")
    return tuple(_norm(setting[k]) for k in key_fields)


def read_rows(csv_path: str | os.PathLike) -> list[dict]:
    """Rows of a sweep CSV (all values as strings); a trailing partial line is ignored."""
    if not os.path.exists(csv_path):
        return []
    with open(csv_path, newline="", encoding="utf-8") as f:
        text = f.read()
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    return list(csv.DictReader(io.StringIO(text)))


def _repair(csv_path: str) -> list[str] | None:
    """Drop a partial last line; return the existing header (None if the file is new/empty)."""
    if not os.path.exists(csv_path):
        return None
    with open(csv_path, newline="", encoding="utf-8") as f:
        text = f.read()
    if text and not text.endswith("\n"):
        with open(csv_path, "w", newline="", encoding="utf-8") as f:
            f.write(text[: text.rfind("\n") + 1])
    with open(csv_path, newline="", encoding="utf-8") as f:
        header = next(csv.reader(f), None)
    return header or None


def run_sweep(settings: Iterable[Mapping[str, Any]], generate_and_score: Callable[[dict], Mapping[str, Any]],
              csv_path: str | os.PathLike, *, key_fields: Sequence[str] = KEY_FIELDS,
              plot_path: str | os.PathLike | None = None) -> list[dict]:
    """Run ``generate_and_score(setting) -> row`` for every setting not yet in ``csv_path``.

    Each row is ``{**setting, **row}`` (a row may not contradict its setting's key fields); the CSV
    header is fixed by the first row ever written (key fields first). Returns all rows of the CSV
    after the sweep (strings, as read back) and, if ``plot_path`` is given, draws the frontier.
    """
    csv_path = os.fspath(csv_path)
    header = _repair(csv_path)
    done = {setting_key(r, key_fields) for r in read_rows(csv_path)}
    seen = set()
    for setting in settings:
        key = setting_key(setting, key_fields)
        if key in seen:
            raise ValueError(f"sweep setting {dict(setting)} appears twice in the grid")
        seen.add(key)
        if key in done:
            continue
        result = dict(generate_and_score(dict(setting)))
        clash = [k for k in key_fields if k in result and _norm(result[k]) != _norm(setting[k])]
        if clash:
            raise ValueError(f"generate_and_score changed the key field(s) {clash} of setting {dict(setting)}")
        row = {**setting, **result}
        if header is None:
            header = list(key_fields) + [k for k in row if k not in key_fields]
            with open(csv_path, "w", newline="", encoding="utf-8") as f:
                csv.writer(f).writerow(header)
        extra = [k for k in row if k not in header]
        if extra:
            raise ValueError(f"row for setting {dict(setting)} has columns {extra} that are not in the header "
                             f"of {csv_path} ({header}); keep generate_and_score's keys fixed across a sweep")
        with open(csv_path, "a", newline="", encoding="utf-8") as f:
            csv.DictWriter(f, fieldnames=header).writerow(row)
            f.flush()
            os.fsync(f.fileno())
        done.add(key)
    rows = read_rows(csv_path)
    if plot_path is not None and rows:
        plot_frontier(rows, plot_path)
    return rows


def plot_frontier(rows: Sequence[Mapping[str, Any]], png_path: str | os.PathLike, *, x: str = "entropy",
                  y: str = "gen_ppl", curve_field: str = "steps", title: str | None = None) -> None:
    """PNG of ``y`` (log scale) vs ``x``: one curve per ``curve_field`` value, points sorted by x and
    annotated ``T=<temperature> p=<top_p>``, a star at temperature 1 and top_p 1."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    def num(row, field, default=float("nan")):
        try:
            return float(row[field])
        except (KeyError, TypeError, ValueError):
            return default

    curves: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        curves.setdefault(str(row.get(curve_field, "")), []).append(row)
    fig, ax = plt.subplots(figsize=(7, 5))
    for name in sorted(curves, key=lambda s: (num({"v": s}, "v", float("inf")), s)):
        pts = sorted(curves[name], key=lambda r: num(r, x))
        xs, ys = [num(r, x) for r in pts], [num(r, y) for r in pts]
        (line,) = ax.plot(xs, ys, marker="o", label=f"{curve_field}={name}")
        for r, xv, yv in zip(pts, xs, ys):
            label = f"T={num(r, 'temperature'):g} p={num(r, 'top_p'):g}"
            ax.annotate(label, (xv, yv), fontsize=6, xytext=(3, 3), textcoords="offset points")
            if num(r, "temperature", 1.0) == 1.0 and num(r, "top_p", 1.0) == 1.0:
                ax.plot([xv], [yv], marker="*", markersize=15, color=line.get_color(), zorder=5)
    ax.set_yscale("log")
    ax.set_xlabel(f"{x} (nats)" if x == "entropy" else x)
    ax.set_ylabel(f"{y} (log scale)")
    ax.set_title(title or "generative frontier (star: T=1, top_p=1)")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.fspath(png_path), dpi=120)
    plt.close(fig)
