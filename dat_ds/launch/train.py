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
from pathlib import Path
from typing import Any

from ..core import dist
from ..core.config import RunConfig, build_config
from ..core.errors import ConfigError
from .entry import run_entry

log = logging.getLogger("dat_ds.launch.train")


def add_run_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "--recipe", dest="config", default=None, help="recipe YAML (see recipes/)")
    parser.add_argument("--deepspeed_config", "--ds-config", dest="deepspeed_config", default=None,
                        help="DeepSpeed JSON (see ds_configs/); overrides the recipe's deepspeed_config")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set attack.eps=0.1 (repeatable)")
    parser.add_argument("--name", default=None, help="run name: outputs go to <output_dir>/<name>/")
    parser.add_argument("--epochs", type=int, default=None, help="shortcut for --set train.epochs=N")
    parser.add_argument("--output-dir", default=None, help="shortcut for --set output_dir=DIR")
    parser.add_argument("--resume", default=None, metavar="auto|DIR",
                        help="continue from the newest complete checkpoint of this run (auto) or of DIR")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing run folder of the same name")
    parser.add_argument("--dry-run", action="store_true", help="validate the configs and exit")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="allow legacy pickle data files (they can run code when loaded; only for files you trust)")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="dat-ds distributed adversarial training", add_help=True)
    add_run_args(parser)
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the DeepSpeed launcher
    return parser


def config_from_args(args: argparse.Namespace, base: dict[str, Any] | None = None) -> RunConfig:
    overrides = list(args.overrides)
    if args.deepspeed_config:
        overrides.append(f"deepspeed_config={args.deepspeed_config}")
    if args.name:
        overrides.append(f"name={args.name}")
    if args.epochs is not None:
        overrides.append(f"train.epochs={args.epochs}")
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    if getattr(args, "trust_pickle", False):
        overrides.append("data.trust_pickle=true")
    return build_config(args.config, overrides, base=base)


def check_run_dir(cfg: RunConfig, resume: str | None, overwrite: bool) -> Path:
    run_dir = cfg.run_dir
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"output path {str(run_dir)!r} is a file; choose another output_dir or name")
    parent = run_dir.parent
    probe = parent if parent.exists() else next((p for p in parent.parents if p.exists()), Path("."))
    import os

    if not probe.is_dir():
        raise ConfigError(f"output path {str(run_dir)!r} lies under the file {str(probe)!r}; choose another --output-dir")
    if not os.access(probe, os.W_OK):
        raise ConfigError(f"output folder {str(probe)!r} is not writable; choose another --output-dir")
    if resume is None and (run_dir / "checkpoint").exists() and any((run_dir / "checkpoint").iterdir()):
        if not overwrite:
            raise ConfigError(
                f"run folder {str(run_dir)!r} already holds a run; pass --resume auto to continue it, "
                "--overwrite to replace it, or --name NEW"
            )
    return run_dir


def dry_run(cfg: RunConfig, world_size: int | None = None) -> dict[str, Any]:
    """Validate both documents for ``world_size`` ranks without touching data or starting processes."""
    from ..runtime import ds_config
    from ..models import MODELS

    world = world_size or dist.world_size()
    settings = ds_config.prepare(cfg.deepspeed_config, world)
    from ..objectives import OBJECTIVES
    from ..attacks import ATTACKS
    from ..data import DATASETS

    OBJECTIVES.get(cfg.objective.name)
    ATTACKS.get(cfg.attack.name)
    DATASETS.get(cfg.data.name)
    if cfg.model.name not in MODELS:
        import timm

        if not timm.is_model(cfg.model.name):
            MODELS.get(cfg.model.name)  # raises the one-line error listing the choices
    return {"world_size": world, "global_batch": settings.global_batch, "micro_batch_per_rank": settings.micro_batch,
            "grad_accum": settings.grad_accum, "zero_stage": settings.zero_stage, "precision": settings.precision}


def main(args: argparse.Namespace, base: dict[str, Any] | None = None) -> dict[str, Any]:
    dist.setup_logging()
    cfg = config_from_args(args, base)
    if args.dry_run:
        info = dry_run(cfg, getattr(args, "dry_run_world", None))
        log.info("resolved config:\n%s", cfg.to_yaml().rstrip())
        log.info("config OK: %s", json.dumps(info))
        return info
    check_run_dir(cfg, args.resume, args.overwrite)
    from .preflight import preflight

    preflight(cfg, args.resume)  # bad data, models, checkpoints: one line before any output is written
    from ..runtime.trainer import run_training

    return run_training(cfg, resume=args.resume, overwrite=args.overwrite)


def cli_entry(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    return run_entry(lambda: main(args))


if __name__ == "__main__":
    sys.exit(cli_entry())
