"""Distributed adversarial training entry point.

Launch it the way DeepSpeed users already do::

    deepspeed --num_gpus 2 --module dat_ds.train --config recipes/demo.yaml --deepspeed_config ds_configs/zero0_fp32.json

or through ``dat-ds train --nproc 2 ...``, which starts that launcher for you. Structure follows the
torchvision references: ``cli.args.train_args_parser() -> main(request) -> train_one_epoch(...) ->
evaluate(...)``; each rank parses its own arguments into a ``TrainRequest`` (``cli.ranks.train_rank``).

Rank 0 of the run owns the run folder's lock (``launch.runlock``) from after the validation pass until it
exits; ``--overwrite`` moves the old run aside only once everything has been built (``runtime.trainer``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
from typing import Any

from ..core import dist, stop
from ..core.errors import ConfigError
from ..core.requests import TrainRequest
from . import data_sizes
from .status import STATUS_ENV, install_signal_status
from .validate import check_model_name, dry_run_report, train_inputs

log = logging.getLogger(__name__)

__all__ = ["main"]


def main(request: TrainRequest, base: dict[str, Any] | None = None, *, world: int | None = None) -> dict[str, Any]:
    """One rank of a run (the world may be 1): the validation pass, then training.

    ``world`` is the world size to validate for; None means this process's (a rank's) world size.
    """
    dist.setup_logging()
    # srun/mpirun's ranks (`srun dat-ds train` too): their world, before anything reads the rank or the world size
    cluster = dist.adopt_cluster_env()
    world = cluster.world_size if cluster else world or dist.world_size()
    cfg, settings = train_inputs(request, world, base=base)
    if request.dry_run:  # validate for the requested world size; nothing heavy, no process is started
        check_model_name(cfg.model.name)
        if settings.precision in ("bf16", "fp16"):  # asks the accelerator (imports torch); fp32 runs everywhere
            from .preflight import check_precision

            check_precision(settings)  # bf16/fp16 this machine's accelerator lacks: the start would fail
        sizes = data_sizes.count(cfg)  # headers and file listings only: no image decoded, no torch
        info = dry_run_report(cfg, settings, world)
        log.info("resolved config:\n%s", cfg.to_yaml().rstrip())
        for line in data_sizes.describe(cfg, sizes):
            log.info("%s", line)
        log.info("config OK: %s", json.dumps(info))
        return info
    from . import runlock

    if dist.rank() == 0:  # another live run on this folder: say so before the heavy checks (rank 0 owns the lock)
        runlock.check_free(cfg.run_dir)
    from .preflight import preflight

    allow = request.allow_world_size_change
    preflight(cfg, request.resume, world, allow_world_size_change=allow)  # bad data, models, checkpoints: one line before any output is written
    from ..evaluation.training import run_training

    dist.init_distributed(timeout_s=cfg.dist.timeout_s)  # before lock_run's collective: every one has the timeout
    lock = lock_run(cfg.run_dir)
    launched = bool(os.environ.get(STATUS_ENV))  # a rank launch() started: status' handler, the command speaks
    in_process = not launched and dist.world_size() == 1  # no launch(): nobody else says it
    # the signals save_on_signal acts on; SIGUSR1/SIGUSR2 get a handler only if listed (else: their default)
    listed = stop.signal_numbers(cfg.train.stop_signals) if cfg.train.save_on_signal else frozenset()
    if launched:
        install_signal_status(listed - {signal.SIGINT})  # launch() passes Ctrl-C on as SIGTERM
    # Our own handlers: every stop signal of a run in this process; the listed ones in a rank that srun, torchrun,
    # mpirun or the deepspeed launcher started (SLURM's --signal=USR1@120 reaches every task of the job's steps).
    own = frozenset({signal.SIGTERM, signal.SIGINT}) | listed if in_process else frozenset() if launched else listed
    try:
        with _stop_on_signals(own):
            return run_training(cfg, resume=request.resume, overwrite=request.overwrite,
                                allow_world_size_change=allow)
    except BaseException as e:
        if lock is not None:  # the trainer settles --overwrite itself; this catches a stop outside it
            settle_leftovers(cfg.run_dir, os.getpid())
        # Nobody else names the checkpoint to resume from: this process (rank 0 of ranks started without launch())
        if not launched and dist.rank() == 0 and isinstance(e, (stop.Stopped, KeyboardInterrupt)):
            from .launcher import Interrupted, interrupted_line

            signum = e.signum if isinstance(e, stop.Stopped) else signal.SIGINT
            line = interrupted_line(cfg.run_dir / "checkpoint", remove_unfinished=in_process)
            raise Interrupted(signum, line) from None
        raise
    finally:
        if lock is not None:
            lock.release()


@contextlib.contextmanager
def _stop_on_signals(signals: frozenset[int]):
    """``signals`` raise ``core.stop.Stopped`` (exit 128 + the signal; rank 0 names the checkpoint in the
    ``interrupted:`` line); while the trainer defers them (``train.save_on_signal``) the first one only asks it to
    stop after the step. A run in the ``dat-ds`` process itself: SIGTERM, SIGINT and ``train.stop_signals``; a
    rank srun/torchrun/mpirun started: ``train.stop_signals`` (``launch()``'s ranks have ``status``' handler)."""
    if not signals or threading.current_thread() is not threading.main_thread():
        yield
        return
    stop.reset()

    def handler(signum, frame):
        if stop.deferred(signum) and stop.received() is None:
            stop.record(signum)
            return
        raise stop.Stopped(signum)  # not deferred, or a second signal: stop here

    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        stop.reset()


def lock_run(run_dir, fix: str | None = None):
    """Rank 0 locks the run folder (``runlock``); every rank learns the outcome, so a refusal is one line
    from every rank alike (printed once) rather than rank 0 failing alone. Returns the lock on rank 0.
    ``fix``: what the refusal suggests (``runlock.TRAIN_FIX`` by default)."""
    from . import runlock

    dist.init_distributed()
    lock, problem = None, None
    if dist.is_main_process():
        try:
            lock = runlock.acquire(run_dir, fix or runlock.TRAIN_FIX)
        except ConfigError as e:
            problem = str(e)
    problem = dist.all_gather_object(problem)[0]
    if problem is not None:
        raise ConfigError(problem)
    return lock


def settle_leftovers(run_dir, pid: int) -> None:
    """Old runs that process ``pid`` moved aside under --overwrite and could not settle (it stopped outside
    the trainer, or was killed): put back unless the new run has a complete checkpoint."""
    from ..runtime.run_dir import overwritten_by, settle_overwritten

    for aside in overwritten_by(run_dir, pid):
        settle_overwritten(run_dir, aside)
