"""A stop asked for by a signal, as the training loop sees it (``train.save_on_signal``).

The run entry installs the handlers (``launch.status`` in a rank that ``launch()`` started: SIGTERM, plus
the run's ``train.stop_signals``; ``launch.train`` for a run in the ``dat-ds`` process itself: SIGTERM,
SIGINT and those). By default they stop the process where it is. For the signals a trainer has passed to
:func:`defer` (its ``train.stop_signals``) they only :func:`record` the signal here: the trainer ends the
step in progress, agrees with the other ranks, writes a final checkpoint if it fits in the grace period
(:func:`grace_s`, the time the launcher waits before it SIGKILLs), and raises :class:`Stopped`, whose
exit code is 128 + the signal. Nothing here imports torch.
"""

from __future__ import annotations

import os
import signal
import time
from contextlib import contextmanager
from typing import Iterable, Iterator

GRACE_ENV = "DAT_DS_STOP_GRACE_S"  # set by launch() for its ranks: seconds between its SIGTERM and its SIGKILL
DEFAULT_GRACE_S = 20.0  # launch.launcher.STOP_GRACE_S; a run in the dat-ds process assumes the same of its scheduler


class Stopped(BaseException):
    """The run stopped on a signal at a step boundary. A BaseException, as KeyboardInterrupt: an
    ``except Exception`` on the way up must not swallow it."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by signal {signum}")
        self.signum = signum
        self.code = 128 + signum  # 143 TERM, 130 INT, 138 USR1, 140 USR2: stopped, resumable with --resume auto


def signal_numbers(names: Iterable[str]) -> frozenset[int]:
    """``("SIGTERM", "SIGUSR1")`` (``train.stop_signals``, validated names) -> their numbers."""
    return frozenset(signal.Signals[name].value for name in names)


_EVERY = frozenset(range(1, signal.NSIG))  # held(): whatever signal a handler sees is recorded
_deferred: frozenset[int] = frozenset()  # the signals the handlers record instead of stopping the process
_received: tuple[int, float] | None = None  # (first signal, time.monotonic() it came)


def defer(signals: Iterable[int] = ()) -> None:
    """The handlers record ``signals`` instead of stopping the process (the trainer stops it); ``()``: none."""
    global _deferred
    _deferred = frozenset(signals)


def deferred(signum: int) -> bool:
    return signum in _deferred


def record(signum: int) -> None:
    """Called by a signal handler: the first signal and when it came (later ones, e.g. the per-node
    launcher passing the same SIGTERM on, change nothing)."""
    global _received
    if _received is None:
        _received = (signum, time.monotonic())


def received() -> tuple[int, float] | None:
    return _received


def reset() -> None:
    """A new run in this process (tests, in-process runs) starts with no signal and no deferral."""
    global _received, _deferred
    _received, _deferred = None, frozenset()


def grace_s() -> float:
    try:
        return float(os.environ.get(GRACE_ENV, DEFAULT_GRACE_S))
    except ValueError:
        return DEFAULT_GRACE_S


@contextmanager
def held() -> Iterator[None]:
    """A section a signal must not cut in two (a checkpoint's commit: its rename and ``latest``).

    The handlers only record a signal that comes meanwhile; at the end it is raised again, so the handler
    does then what it would have done (unless a trainer defers that signal anyway: it has it recorded).
    """
    global _deferred, _received
    outer_deferred, outer_received = _deferred, _received
    _deferred = _EVERY
    try:
        yield
    finally:
        _deferred = outer_deferred
        if outer_received is None and _received is not None and _received[0] not in outer_deferred:
            signum, _received = _received[0], None
            signal.raise_signal(signum)
