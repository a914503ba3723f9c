"""Rank entry of ``dat-ds eval``: ``deepspeed --num_gpus N --module dat_ds.launch.evaluate --run runs/demo``."""

from __future__ import annotations

import sys

from .args import eval_args_parser
from .entry import run_entry


def main(args) -> dict:
    """The validation pass (the same as the CLI's), then this rank's share of the evaluation."""
    from ..evaluation import run
    from .validate import eval_inputs

    eval_inputs(args)
    return run.main(args)


def cli_entry(argv: list[str] | None = None) -> int:
    args = eval_args_parser().parse_args(argv)
    return run_entry(lambda: main(args))


if __name__ == "__main__":
    sys.exit(cli_entry())
