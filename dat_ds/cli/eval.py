"""Registers ``dat-ds eval``: one process in place, or ``--nproc N`` ranks through the one launcher."""

from __future__ import annotations

import argparse

from ..launch.launcher import check_master_port, launch, strip_launch_args, world_size_of
from . import command
from .args import add_eval_args, add_launch_args, eval_request


def _eval_args(p: argparse.ArgumentParser) -> None:
    add_eval_args(p)
    add_launch_args(p)


def _eval(args: argparse.Namespace, argv: list[str]) -> int:
    from ..launch.validate import eval_inputs

    world_size_of(args.nproc, args.hostfile)
    check_master_port(args.master_port)  # the launching process's own flag; the ranks never see it
    request = eval_inputs(eval_request(args))  # torch-free: user mistakes exit here with code 2, before anything heavy
    if args.nproc == 1 and not args.hostfile:
        from ..launch.evaluate import main

        main(request)
        return 0
    import time

    from ..launch import runlock
    from ..launch.evaluate import written_run_dir
    from ..launch.preflight import preflight_eval
    from .ranks import EVAL_MODULE

    # heavy: the checkpoint, the model name, the data; still before any rank starts
    preflight_eval(request, nproc=None if args.hostfile else args.nproc)
    run_dir = written_run_dir(request)
    if run_dir is not None:  # a run (or another eval) writing that folder: refused before any rank starts
        runlock.check_free(run_dir, runlock.EVAL_FIX)
    started = time.time()
    try:
        return launch(EVAL_MODULE, strip_launch_args(argv), nproc=args.nproc, hostfile=args.hostfile,
                      master_port=args.master_port)
    except BaseException:
        if run_dir is not None and not args.hostfile:  # rank 0 holds the lock; if it died, remove it
            runlock.clear_dead(run_dir, started)
        raise


command("eval", "robust accuracy of a checkpoint under attacks and eps values (--nproc N shards the test set; "
        "--sanity checks for gradient masking)")((_eval_args, _eval))
