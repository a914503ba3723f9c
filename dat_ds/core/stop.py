"""A stop asked for by a signal, as the training loop sees it (``train.save_on_signal``).

The run entry installs the SIGTERM/SIGINT handlers (``launch.status`` in a rank that ``launch()``
started, ``launch.train`` for a run in the ``dat-ds`` process itself). By default they stop the process
where it is. While a trainer has called :func:`defer` they only :func:`record` the signal here: the
trainer ends the step in progress, agrees with the other ranks, writes a final checkpoint if it fits in
the grace period (:func:`grace_s`, the time the launcher waits before it SIGKILLs), and raises
:class:`Stopped`. Nothing here imports torch.
"""

from __future__ import annotations

import os
import signal
import time
from contextlib import contextmanager
from typing import Iterator

GRACE_ENV = "DAT_DS_STOP_GRACE_S"  # set by launch() for its ranks: seconds between its SIGTERM and its SIGKILL
DEFAULT_GRACE_S = 20.0  # launch.launcher.STOP_GRACE_S; a run in the dat-ds process assumes the same of its scheduler


class Stopped(BaseException):
    """The run stopped on a signal at a step boundary. A BaseException, as KeyboardInterrupt: an
    ``except Exception`` on the way up must not swallow it."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by signal {signum}")
        self.signum = signum
        self.code = 128 + signum  # 143 TERM, 130 INT


_deferred = False
_received: tuple[int, float] | None = None  # (first signal, time.monotonic() it came)


def defer(on: bool = True) -> None:
    """While on, the handlers record a signal instead of stopping the process (the trainer stops it)."""
    global _deferred
    _deferred = on


def deferred() -> bool:
    return _deferred


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
    _received, _deferred = None, False


def grace_s() -> float:
    try:
        return float(os.environ.get(GRACE_ENV, DEFAULT_GRACE_S))
    except ValueError:
        return DEFAULT_GRACE_S


@contextmanager
def held() -> Iterator[None]:
    """A section a signal must not cut in two (a checkpoint's commit: its rename and ``latest``).

    The handlers only record a signal that comes meanwhile; at the end it is raised again, so the handler
    does then what it would have done (unless a trainer defers signals anyway: it has the signal recorded).
    """
    global _deferred, _received
    outer_deferred, outer_received = _deferred, _received
    _deferred = True
    try:
        yield
    finally:
        _deferred = outer_deferred
        if not outer_deferred and outer_received is None and _received is not None:
            signum, _received = _received[0], None
            signal.raise_signal(signum)
