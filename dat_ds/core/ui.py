"""Terminal output for people: rich progress bars and end-of-run tables (rank 0 only)."""

from __future__ import annotations

import logging
import os
import sys
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from . import dist

WIDTH_WITHOUT_TERMINAL = 200


def make_console(file=None) -> Console:
    """rich draws 80 columns when not writing to a terminal, which cuts a log file's tables to ``baseli…``
    and breaks long lines (paths) anywhere. There (unless ``COLUMNS`` says otherwise) tables get room for their
    natural width and printed lines are never wrapped, so a log file stays greppable."""
    target = file if file is not None else sys.stdout
    terminal = getattr(target, "isatty", lambda: False)()
    if terminal or os.environ.get("COLUMNS"):
        return Console(file=file, stderr=False, highlight=False)
    return Console(file=file, stderr=False, highlight=False, width=WIDTH_WITHOUT_TERMINAL, soft_wrap=True)


console = make_console()
log = logging.getLogger(__name__)
PROGRESS_LOG_EVERY_S = 60.0  # without a terminal (a batch job's log file): one progress line a minute at most


@contextmanager
def progress_bar(total: int, description: str, enabled: bool = True,
                 log_every_s: float = PROGRESS_LOG_EVERY_S) -> Iterator[Callable[[int], None]]:
    """Yields ``advance(n)``; on rank 0 only. On a terminal it draws a bar; otherwise (output to a file, as
    under a batch scheduler) it logs ``description: done/total (pct), elapsed, ~left`` at most every
    ``log_every_s`` seconds, so a long epoch or evaluation is never silent."""
    if not (enabled and dist.is_main_process()):
        yield lambda n: None
        return
    if not sys.stdout.isatty():
        yield _progress_logger(total, description, log_every_s)
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=console, transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


def _progress_logger(total: int, description: str, every_s: float) -> Callable[[int], None]:
    start = time.monotonic()
    state = {"done": 0, "last": start}

    def advance(n: int) -> None:
        state["done"] += n
        now = time.monotonic()
        done = min(state["done"], total)
        if now - state["last"] < every_s or done >= total:
            return  # the end is the caller's own line (epoch summary, result table)
        state["last"] = now
        elapsed = now - start
        left = elapsed * (total - done) / done if done else float("nan")
        log.info("%s: %d/%d (%.0f %%), %s elapsed, ~%s left", description, done, total, 100 * done / total,
                 clock(elapsed), clock(left))

    return advance


def clock(seconds: float) -> str:
    """``1:02:03`` / ``2:03`` for a duration in seconds (``?`` when unknown)."""
    if seconds != seconds:
        return "?"
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> Table:
    t = Table(title=title)
    for c in columns:
        t.add_column(c, justify="right" if c not in ("recipe", "attack", "check", "status", "detail", "arm", "name", "case", "optimizer", "method") else "left")
    for r in rows:
        t.add_row(*[fmt(v) for v in r])
    return t


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def show(renderable) -> None:
    if dist.is_main_process():
        console.print(renderable)
