"""Generative frontiers: a resumable sweep over sampler settings and its gen-PPL vs entropy plot.

A frontier (docs/theory.md §7, App. A; "compare curves, not points") is one curve per number of steps, each
point a (temperature, top_p) setting, x = mean unigram entropy, y = gen PPL on a log axis; the point
at temperature 1 and top_p 1 (the untempered model) is marked with a star.

The sweep writes one CSV row per setting, appended and flushed as soon as it is computed, so a
killed sweep restarts where it stopped: settings whose key already has a row are skipped. The key is
the swept fields (``key_fields``) plus ``context_id``, a hash of everything else that changes a result
(number of samples, seeds, batch size, the other sampler options, checkpoint, judge, ...), so a rerun
with another ``--num-samples`` recomputes instead of returning the old rows. Rows of other contexts
stay in the CSV (and their contexts in ``<csv>.contexts.json``) but are neither reused nor plotted.
A partially written last line (a crash mid-write) is removed on restart.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

KEY_FIELDS = ("steps", "temperature", "top_p")
CONTEXT_FIELD = "context_id"


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


def context_id(context: Mapping[str, Any] | None) -> str:
    """12 hex digits identifying a sweep's fixed settings (canonical JSON, sha256); '' without context."""
    if not context:
        return ""
    return hashlib.sha256(json.dumps(context, sort_keys=True, default=str).encode()).hexdigest()[:12]


def typed(row: Mapping[str, Any]) -> dict:
    """A CSV row with numbers as numbers (``"16"`` -> 16, ``"0.9"`` -> 0.9, ``""`` -> None)."""
    out = {}
    for k, v in row.items():
        if isinstance(v, str):
            for conv in (int, float):
                try:
                    v = conv(v)
                    break
                except ValueError:
                    pass
            else:
                v = None if v == "" else v
        out[k] = v
    return out


def _context_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    """``num_samples 32 -> 64, seed 0 -> 1`` (the fields whose values differ)."""
    keys = sorted(set(old) | set(new), key=str)
    return ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k))


def _record_context(csv_path: str, cid: str, context: Mapping[str, Any]) -> dict:
    """Add ``cid -> context`` to ``<csv>.contexts.json``; return every recorded context."""
    from udmtrain.utils.io import write_text_atomic

    path = csv_path + ".contexts.json"
    known = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            known = json.load(f)
    if cid not in known:
        write_text_atomic(path, json.dumps({**known, cid: dict(context)}, indent=1, sort_keys=True,
                                           default=str) + "\n")
    return known


def run_sweep(settings: Iterable[Mapping[str, Any]], generate_and_score: Callable[[dict], Mapping[str, Any]],
              csv_path: str | os.PathLike, *, key_fields: Sequence[str] = KEY_FIELDS,
              plot_path: str | os.PathLike | None = None, context: Mapping[str, Any] | None = None,
              log: Callable[[str], None] | None = None, on_progress: Callable[[int], None] | None = None) -> list[dict]:
    """Run ``generate_and_score(setting) -> row`` for every setting not yet in ``csv_path``.

    Each row is ``{**setting, **row}`` (a row may not contradict its setting's key fields), plus
    ``context_id`` when ``context`` (the JSON-able fixed settings) is given; the CSV header is fixed
    by the first row ever written (key fields first). ``log(line)`` hears what was reused and what
    is computed (default: stderr); ``on_progress(1)`` is called after each setting, reused or not.
    Returns this context's rows of the CSV with numbers as numbers (``typed``) and, if ``plot_path``
    is given, draws their frontier.
    """
    csv_path = os.fspath(csv_path)
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    cid = context_id(context)
    fields = tuple(key_fields) + ((CONTEXT_FIELD,) if cid else ())
    header = _repair(csv_path)
    if cid and header is not None and CONTEXT_FIELD not in header:
        raise ValueError(f"{csv_path} has no {CONTEXT_FIELD} column (written by an older udmtrain); move it away "
                         "or pass another --out-dir")
    previous = read_rows(csv_path)
    done = {setting_key(r, fields) for r in previous}
    settings = [dict(s, **({CONTEXT_FIELD: cid} if cid else {})) for s in settings]
    todo = [s for s in settings if setting_key(s, fields) not in done]
    if cid:
        known = _record_context(csv_path, cid, context)
        others = sorted({r.get(CONTEXT_FIELD, "") for r in previous} - {cid})
        for other in others:
            n = sum(r.get(CONTEXT_FIELD, "") == other for r in previous)
            why = _context_diff(known[other], context) if other in known else "unknown settings"
            log(f"udmtrain: {csv_path}: {n} row(s) of other settings ({why}) kept, not reused")
    log(f"udmtrain: sweep of {len(settings)} setting(s): {len(settings) - len(todo)} reused from {csv_path}, "
        f"{len(todo)} to compute")
    seen = set()
    for setting in settings:
        key = setting_key(setting, fields)
        if key in seen:
            raise ValueError(f"sweep setting {dict(setting)} appears twice in the grid")
        seen.add(key)
        if key in done:
            if on_progress is not None:
                on_progress(1)
            continue
        result = dict(generate_and_score({k: v for k, v in setting.items() if k != CONTEXT_FIELD or not cid}))
        clash = [k for k in key_fields if k in result and _norm(result[k]) != _norm(setting[k])]
        if clash:
            raise ValueError(f"generate_and_score changed the key field(s) {clash} of setting {dict(setting)}")
        row = {**setting, **result}
        if header is None:
            header = list(fields) + [k for k in row if k not in fields]
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
        if on_progress is not None:
            on_progress(1)
    rows = [typed(r) for r in read_rows(csv_path) if not cid or r.get(CONTEXT_FIELD) == cid]
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
