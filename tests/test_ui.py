"""Progress without a terminal: a batch job's log file gets progress lines, never a silent hour."""

from __future__ import annotations

import logging
import sys

from dat_ds.core import ui


def _lines(caplog):
    return [r.getMessage() for r in caplog.records if r.name == ui.log.name]


def test_without_a_terminal_progress_is_logged_with_counts_and_time_left(monkeypatch, caplog):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False)
    caplog.set_level(logging.INFO, logger=ui.log.name)
    with ui.progress_bar(10, "eval", log_every_s=0.0) as advance:
        for _ in range(5):
            advance(2)
    lines = _lines(caplog)
    # 2, 4, 6, 8 of 10; the last advance (10/10) is left to the caller's own summary line
    assert [line.split(":")[1].split("(")[0].strip() for line in lines] == ["2/10", "4/10", "6/10", "8/10"]
    assert lines[1].startswith("eval: 4/10 (40 %), 0:00 elapsed, ~0:00 left")


def test_progress_lines_are_rate_limited_and_off_when_disabled(monkeypatch, caplog):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False)
    caplog.set_level(logging.INFO, logger=ui.log.name)
    with ui.progress_bar(100, "epoch 1/3", log_every_s=3600.0) as advance:
        for _ in range(99):
            advance(1)
    with ui.progress_bar(100, "epoch 2/3", enabled=False, log_every_s=0.0) as advance:
        advance(50)
    assert _lines(caplog) == []


def test_clock_formats_durations():
    assert [ui.clock(s) for s in (0, 59.6, 61, 3600, 3725, float("nan"))] == \
        ["0:00", "1:00", "1:01", "1:00:00", "1:02:05", "?"]
