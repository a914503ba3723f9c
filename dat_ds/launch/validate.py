"""The one validation pass: every command checks all of its inputs here before any rank starts.

Two halves, run in this order by the command line (in the launcher process) and again by every rank:

* ``train_inputs`` / ``eval_inputs`` -- torch-free: config keys and values, registered names (static,
  ``core/names.py``), the DeepSpeed JSON with its batch arithmetic for the requested world size, files
  and output paths. A mistake here costs a fraction of a second and imports nothing heavy.
* ``launch.preflight`` -- heavy: data files, checkpoints to resume, attack settings, and model names that
  are not ours (``check_model_name`` imports timm only for those).

Every failure is a one-line ``ConfigError`` (exit code 2 through ``launch.entry.run_entry``).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from ..core import names, resources
from ..core.config import RunConfig, build_config, check_engine
from ..core.errors import ConfigError

__all__ = ["check_model_name", "check_run_dir", "config_from_args", "dry_run_report", "eval_inputs", "named_flags",
           "recipe_path", "train_inputs"]


def recipe_path(path: str | None) -> str | None:
    """A recipe file path, or a shipped recipe's name (``demo``, ``recipes/demo.yaml`` from anywhere)."""
    return None if path is None else str(resources.recipe(path))


def named_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The named options as typed config values (never YAML text: ``--name "exp #3"`` stays whole)."""
    flags: dict[str, Any] = {}
    if args.deepspeed_config is not None:
        flags["deepspeed_config"] = args.deepspeed_config
    if args.name is not None:
        flags["name"] = args.name
    if args.epochs is not None:
        flags["train"] = {"epochs": args.epochs}
    if args.output_dir is not None:
        flags["output_dir"] = args.output_dir
    if getattr(args, "trust_pickle", False):
        flags["data"] = {"trust_pickle": True}
    return flags


def config_from_args(args: argparse.Namespace, base: dict[str, Any] | None = None) -> RunConfig:
    """Recipe, then ``--set`` overrides, then the named options (they win)."""
    return build_config(recipe_path(args.config), list(args.overrides), base=base, flags=named_flags(args))


def check_run_dir(cfg: RunConfig, resume: str | None, overwrite: bool) -> Path:
    """The run folder can be written and does not hold another run (unless resuming or overwriting)."""
    run_dir = cfg.run_dir
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"output path {str(run_dir)!r} is a file; choose another output_dir or name")
    parent = run_dir.parent
    probe = parent if parent.exists() else next((p for p in parent.parents if p.exists()), Path("."))
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


def check_model_name(name: str) -> None:
    """A model is ours (``core/names.py``) or a timm name; only the latter needs timm to tell."""
    if name in names.MODELS or name in names.PLUGINS["model"]:
        return
    import timm

    if not timm.is_model(name):
        raise ConfigError(f"unknown model {name!r}; use one of {', '.join(names.known('model'))} "
                          "or a timm model name (see `timm.list_models()`)")


def train_inputs(args: argparse.Namespace, world: int, *, needs_unlabeled_objective: bool = False,
                 base: dict[str, Any] | None = None):
    """The torch-free half for ``train`` / ``demo`` / ``pretrain``: returns ``(cfg, engine settings)``."""
    from ..runtime import ds_config
    from .args import check_master_port

    check_master_port(getattr(args, "master_port", None))  # only the launching process has it
    cfg = config_from_args(args, base)
    if needs_unlabeled_objective and cfg.objective.name not in names.UNLABELED_OBJECTIVES:
        raise ConfigError(f"dat-ds pretrain needs a self-supervised objective "
                          f"({', '.join(names.UNLABELED_OBJECTIVES)}), the config has {cfg.objective.name!r}; "
                          f"set objective.name=acl or use `dat-ds train`")
    settings = ds_config.prepare(cfg.deepspeed_config, world)
    check_engine(cfg, settings.zero_stage)
    if not getattr(args, "dry_run", False):
        check_run_dir(cfg, args.resume, args.overwrite)
    return cfg, settings


def dry_run_report(cfg: RunConfig, settings, world: int) -> dict[str, Any]:
    return {"world_size": world, "global_batch": settings.global_batch, "micro_batch_per_rank": settings.micro_batch,
            "grad_accum": settings.grad_accum, "zero_stage": settings.zero_stage, "precision": settings.precision}


def eval_inputs(args: argparse.Namespace) -> None:
    """The torch-free half for ``eval``: arguments, attack/data names, files and the output folder."""
    from .args import check_eval_args

    check_eval_args(args)
