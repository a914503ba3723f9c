"""Registers ``dat-ds eval``: one process in place, or ``--nproc N`` ranks through the DeepSpeed launcher."""

from __future__ import annotations

import argparse

from ..launch.launcher import add_launch_args, launch, strip_launch_args
from . import command
from ..core.errors import ConfigError


def _eval_args(p: argparse.ArgumentParser) -> None:
    from ..evaluation.run import add_eval_args

    add_eval_args(p)
    add_launch_args(p)


def _eval(args: argparse.Namespace, argv: list[str]) -> int:
    from ..evaluation import run

    if args.nproc < 1:
        raise ConfigError(f"--nproc={args.nproc} must be >= 1")
    run.check_args(args)  # user mistakes exit here with code 2, before any rank starts
    if args.nproc == 1 and not args.hostfile:
        run.main(args)
        return 0
    return launch("dat_ds.launch.evaluate", strip_launch_args(argv), nproc=args.nproc, hostfile=args.hostfile,
                  master_port=args.master_port)


command("eval", "robust accuracy of a checkpoint under attacks and eps values (--nproc N shards the test set; "
        "--sanity checks for gradient masking)")((_eval_args, _eval))
