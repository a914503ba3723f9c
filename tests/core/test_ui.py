"""Progress without a terminal: a batch job's log file gets progress lines, never a silent hour."""

from __future__ import annotations

import io
import logging
import sys

import pytest

from dat_ds.core import ui


@pytest.fixture
def progress_lines(monkeypatch, caplog):
    """Output not to a terminal; returns a function giving the progress lines logged so far."""
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False)
    caplog.set_level(logging.INFO, logger=ui.log.name)
    return lambda: [r.getMessage() for r in caplog.records if r.name == ui.log.name]


def test_without_a_terminal_progress_is_logged_with_counts_and_time_left(progress_lines):
    with ui.progress_bar(10, "eval", log_every_s=0.0) as advance:
        for _ in range(5):
            advance(2)
    lines = progress_lines()
    # 2, 4, 6, 8 of 10; the last advance (10/10) is left to the caller's own summary line
    assert [line.split(":")[1].split("(")[0].strip() for line in lines] == ["2/10", "4/10", "6/10", "8/10"]
    assert lines[1].startswith("eval: 4/10 (40 %), 0:00 elapsed, ~0:00 left")


def test_progress_lines_are_rate_limited_and_off_when_disabled(progress_lines):
    with ui.progress_bar(100, "epoch 1/3", log_every_s=3600.0) as advance:
        for _ in range(99):
            advance(1)
    with ui.progress_bar(100, "epoch 2/3", enabled=False, log_every_s=0.0) as advance:
        advance(50)
    assert progress_lines() == []


def test_clock_formats_durations():
    assert [ui.clock(s) for s in (0, 59.6, 61, 3600, 3725, float("nan"))] == \
        ["0:00", "1:00", "1:01", "1:00:00", "1:02:05", "?"]


def test_tables_in_a_log_file_are_not_cut_to_80_columns(monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    out = io.StringIO()  # not a terminal, as a batch job's log file
    columns = ["variant", "clean", "robust", "PGD-20", "robust vs baseline", "95 % interval", "verdict", "train s"]
    row = ["label_smoothing", 0.8087, 0.6327, 0.6553, "+0.0033 ± 0.0015", "[-0.0031, +0.0098]", "no clear effect", 103.7]
    ui.make_console(out).print(ui.table("bench ablations", columns, [row]))
    text = out.getvalue()
    assert "…" not in text
    for cell in ("robust vs baseline", "[-0.0031, +0.0098]", "no clear effect", "label_smoothing"):
        assert cell in text


def test_long_lines_in_a_log_file_are_not_broken(monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    out = io.StringIO()
    line = "wrote " + "/very/long/path" * 30 + ".safetensors (tiny_cnn, 10 classes, ema weights, from a checkpoint)"
    ui.make_console(out).print(line)
    assert out.getvalue() == line + "\n"
