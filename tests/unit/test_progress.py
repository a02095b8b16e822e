"""udmtrain.utils.progress: status lines off a terminal, a tqdm bar on one, silence off rank 0."""

from __future__ import annotations

import io
import re

import pytest

from udmtrain.utils.progress import counting, format_hms, progress


def test_lines_off_a_terminal_have_count_rate_and_eta():
    out = io.StringIO()
    with progress(4, "sampling", unit="nfe", stream=out, interval=0, enabled=True) as bar:
        for _ in range(4):
            bar.update()
    lines = out.getvalue().splitlines()
    assert len(lines) == 4  # one per update (interval 0) before the last, then the final line
    assert lines[0].startswith("udmtrain: sampling 1/4 nfe (25.0%) | ") and " | eta " in lines[0]
    assert re.search(r"\| [0-9.e+]+ (nfe/s|s/nfe) \|", lines[1])
    assert lines[-1].startswith("udmtrain: sampling 4/4 nfe (100.0%) done | ") and "eta" not in lines[-1]


def test_interval_limits_the_lines_and_unknown_totals_work():
    out = io.StringIO()
    bar = progress(None, "judging", unit="sample", stream=out, interval=3600, enabled=True)
    for item in bar.wrap(range(7)):
        pass
    bar.close()
    bar.close()  # idempotent
    assert out.getvalue().splitlines() == [out.getvalue().splitlines()[0]]  # only the final line
    assert out.getvalue().startswith("udmtrain: judging 7 sample done | ") and "%" not in out.getvalue()


def test_other_ranks_are_silent(monkeypatch):
    import udmtrain.utils.dist as dist

    monkeypatch.setenv("RANK", "1")  # before any process group exists
    monkeypatch.setattr(dist, "get_rank", lambda: 1)  # and inside one (the session's gloo group is rank 0)
    out = io.StringIO()
    with progress(3, "eval", stream=out, interval=0) as bar:
        bar.update(3)
    assert out.getvalue() == "" and bar.count == 3


def test_a_terminal_gets_a_tqdm_bar():
    out = io.StringIO()
    with progress(5, "sweep", unit="setting", stream=out, enabled=True, tty=True) as bar:
        bar.update(5)
    assert bar._bar is not None and "sweep" in out.getvalue() and "5/5" in out.getvalue()


def test_counting_counts_calls_and_keeps_attributes():
    seen = []

    def network(x, scale=1):
        return x * scale

    network.device = "cpu"
    counted = counting(network, seen.append)
    assert counted(3, scale=2) == 6 and counted(1) == 1
    assert seen == [1, 1] and counted.device == "cpu"


@pytest.mark.parametrize("seconds,text", [(0, "0:00:00"), (59.6, "0:01:00"), (3723, "1:02:03"), (-2, "0:00:00")])
def test_format_hms(seconds, text):
    assert format_hms(seconds) == text
