"""Rank entry of ``dat-ds eval``: ``deepspeed --num_gpus N --module dat_ds.launch.evaluate --run runs/demo``."""

from __future__ import annotations

import sys

from .entry import run_entry


def cli_entry(argv: list[str] | None = None) -> int:
    from ..evaluation.run import get_args_parser, main

    args = get_args_parser().parse_args(argv)
    return run_entry(lambda: main(args))


if __name__ == "__main__":
    sys.exit(cli_entry())
