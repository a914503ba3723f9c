"""The rank entries: each rank parses its own command line (``deepspeed --module dat_ds.train --config ...``
starts ranks with the user's arguments as they are), turns it into the command's request and runs it under
the one run entry. ``dat_ds.train`` and ``dat_ds.evaluate`` are the modules the launcher starts.
"""

from __future__ import annotations

from ..launch.entry import run_entry
from .args import (
    eval_args_parser,
    eval_request,
    train_args_parser,
    train_request,
    tune_worker_args_parser,
    tune_worker_request,
)

__all__ = ["eval_rank", "train_rank", "tune_rank"]

TRAIN_MODULE = "dat_ds.train"  # what launch() starts for `dat-ds train` / `pretrain` / `demo`
EVAL_MODULE = "dat_ds.evaluate"  # ... and for `dat-ds eval`
TUNE_MODULE = "dat_ds.cli.tune_rank"  # ... and for the measuring ranks of `dat-ds tune` / `bench engine --vs`


def train_rank(argv: list[str] | None = None) -> int:
    """One training rank: ``launch.train.main`` on this rank's arguments; returns the exit code."""
    from ..launch import train

    request = train_request(train_args_parser().parse_args(argv))
    return run_entry(lambda: train.main(request))


def eval_rank(argv: list[str] | None = None) -> int:
    """One evaluation rank: ``launch.evaluate.main`` (the validation pass, then its share) on its arguments."""
    from ..launch import evaluate

    request = eval_request(eval_args_parser().parse_args(argv))
    return run_entry(lambda: evaluate.main(request))


def tune_rank(argv: list[str] | None = None) -> int:
    """One measuring rank of ``dat-ds tune``: ``tune.worker.main`` serving the caller's requests."""
    from ..tune import worker

    request = tune_worker_request(tune_worker_args_parser().parse_args(argv))
    return run_entry(lambda: worker.main(request))
