"""Distributed adversarial training entry point.

Launch it the way DeepSpeed users already do::

    deepspeed --num_gpus 2 --module dat_ds.train --config recipes/demo.yaml --deepspeed_config ds_configs/zero0_fp32.json

or through ``dat-ds train --nproc 2 ...``, which starts that launcher for you. Structure follows the
torchvision references: ``get_args_parser() -> main(args) -> train_one_epoch(...) -> evaluate(...)``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from ..core import dist
from .args import add_run_args, train_args_parser as get_args_parser
from .entry import run_entry
from .validate import check_model_name, check_run_dir, config_from_args, dry_run_report, train_inputs

log = logging.getLogger("dat_ds.launch.train")

__all__ = ["add_run_args", "check_run_dir", "cli_entry", "config_from_args", "get_args_parser", "main"]


def main(args: argparse.Namespace, base: dict[str, Any] | None = None, *, world: int | None = None) -> dict[str, Any]:
    """One rank of a run (the world may be 1): the validation pass, then training.

    ``world`` is the world size to validate for; None means this process's (a rank's) world size.
    """
    dist.setup_logging()
    world = world or dist.world_size()
    cfg, settings = train_inputs(args, world, base=base)
    if args.dry_run:  # validate for the requested world size; nothing heavy, no process is started
        check_model_name(cfg.model.name)
        info = dry_run_report(cfg, settings, world)
        log.info("resolved config:\n%s", cfg.to_yaml().rstrip())
        log.info("config OK: %s", json.dumps(info))
        return info
    from .preflight import preflight

    preflight(cfg, args.resume, world)  # bad data, models, checkpoints: one line before any output is written
    from ..evaluation.training import run_training

    return run_training(cfg, resume=args.resume, overwrite=args.overwrite)


def cli_entry(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    return run_entry(lambda: main(args))


if __name__ == "__main__":
    sys.exit(cli_entry())
