"""What each rank of ``dat-ds eval`` runs (``deepspeed --num_gpus N --module dat_ds.evaluate --run runs/demo``;
the rank entry, ``cli.ranks.eval_rank``, parses the arguments into an ``EvalRequest``).

An evaluation that writes into a run folder (``--run`` without ``--out``) holds that folder's lock
(``launch.runlock``, taken by rank 0) while it runs: it is refused while a training run or another
evaluation holds it, and a training run is refused while it does.
"""

from __future__ import annotations

from pathlib import Path

from ..core.requests import EvalRequest


def main(request: EvalRequest) -> dict:
    """The validation pass (the same as the CLI's), then this rank's share of the evaluation."""
    from ..evaluation import run
    from . import runlock
    from .train import lock_run
    from .validate import eval_inputs

    request = eval_inputs(request)
    run_dir = written_run_dir(request)
    lock = lock_run(run_dir, runlock.EVAL_FIX) if run_dir is not None else None
    try:
        return run.main(request)
    finally:
        if lock is not None:
            lock.release()


def written_run_dir(request: EvalRequest) -> Path | None:
    """The run folder this evaluation writes ``eval.json`` into (``--run`` without ``--out``), else None."""
    if request.run is None or request.out is not None:
        return None
    from ..evaluation.loading import resolve_checkpoint

    return resolve_checkpoint(request.run, request.tag)[0]
