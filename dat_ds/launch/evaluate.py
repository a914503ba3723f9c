"""Rank entry of ``dat-ds eval``: ``deepspeed --num_gpus N --module dat_ds.launch.evaluate --run runs/demo``.

An evaluation that writes into a run folder (``--run`` without ``--out``) holds that folder's lock
(``launch.runlock``, taken by rank 0) while it runs: it is refused while a training run or another
evaluation holds it, and a training run is refused while it does.
"""

from __future__ import annotations

import sys

from .args import eval_args_parser
from .entry import run_entry


def main(args) -> dict:
    """The validation pass (the same as the CLI's), then this rank's share of the evaluation."""
    from ..evaluation import run
    from . import runlock
    from .train import lock_run
    from .validate import eval_inputs

    eval_inputs(args)
    run_dir = written_run_dir(args)
    lock = lock_run(run_dir, runlock.EVAL_FIX) if run_dir is not None else None
    try:
        return run.main(args)
    finally:
        if lock is not None:
            lock.release()


def written_run_dir(args):
    """The run folder this evaluation writes ``eval.json`` into (``--run`` without ``--out``), else None."""
    if args.run is None or args.out is not None:
        return None
    from ..evaluation.loading import resolve_checkpoint

    return resolve_checkpoint(args.run, args.tag)[0]


def cli_entry(argv: list[str] | None = None) -> int:
    args = eval_args_parser().parse_args(argv)
    return run_entry(lambda: main(args))


if __name__ == "__main__":
    sys.exit(cli_entry())
