"""Registers ``dat-ds eval``: one process in place, or ``--nproc N`` ranks through the DeepSpeed launcher."""

from __future__ import annotations

import argparse

from . import LAUNCH_FLAGS, _add_launch_args, _strip, command, launch
from ..core.errors import ConfigError


def _eval_args(p: argparse.ArgumentParser) -> None:
    from ..evaluation.run import add_eval_args

    add_eval_args(p)
    _add_launch_args(p)


def _eval(args: argparse.Namespace, argv: list[str]) -> int:
    from ..evaluation import run

    if args.nproc < 1:
        raise ConfigError(f"--nproc={args.nproc} must be >= 1")
    run.check_args(args)  # user mistakes exit here with code 2, before any rank starts
    if args.nproc == 1 and not args.hostfile:
        run.main(args)
        return 0
    return launch("dat_ds.evaluation.run", _strip(argv, LAUNCH_FLAGS), args.nproc, args.hostfile, args.master_port)


command("eval", "robust accuracy of a checkpoint under attacks and eps values (--nproc N shards the test set; "
        "--sanity checks for gradient masking)")((_eval_args, _eval))
