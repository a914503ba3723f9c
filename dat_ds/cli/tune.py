"""``dat-ds tune``: registered on import by ``dat_ds.cli._load_extensions``.

Every argument is checked here, torch-free, before anything is measured: the recipe and its run config,
the starting DeepSpeed JSON with its batch arithmetic for the world size, the budget and the output path.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from . import command
from .args import add_config_args


def _tune_args(p: argparse.ArgumentParser) -> None:
    add_config_args(p, required=True,
                    recipe_help="recipe YAML or a shipped recipe's name: its own training step is what is timed",
                    ds_help="the JSON to start from (default: the recipe's); every speedup is stated against it",
                    set_help="override a run-config key of the recipe, as for train (repeatable)")
    p.add_argument("--nproc", type=int, required=True, help="ranks per node the JSON is tuned for")
    p.add_argument("--hostfile", default=None, help="DeepSpeed hostfile for several nodes (a shared folder is needed)")
    p.add_argument("--budget", default="10m", help="wall time for the whole tune, e.g. 10m, 90s, 1h (default 10m)")
    p.add_argument("--allow-numerics-change", action="store_true",
                   help="also try bf16/fp32 and compressed communication (DAT 8-bit, the 1-bit family): these change "
                        "the optimisation")
    p.add_argument("--allow-batch-change", action="store_true",
                   help="also try other global batch sizes (the recipe's LR scaling rule is applied and reported)")
    p.add_argument("--memory-cap-mb", type=float, default=None,
                   help="CPU: resident memory per rank above which a point counts as out of memory "
                        "(default 80 %% of RAM / ranks); on GPUs an out-of-memory error decides")
    p.add_argument("--out", default=None,
                   help="the tuned JSON (default ds_configs/tuned/<recipe>-<N>x<device>.json under this folder); "
                        "<out>.tuning.json and <out>.png go beside it")


def check_inputs(args: argparse.Namespace, argv: list[str]):
    """The torch-free validation pass of ``tune``; returns ``tune.run.Inputs``."""
    from ..core.config import build_config
    from ..core.errors import ConfigError
    from ..launch.launcher import hostfile_nodes, world_size_of
    from ..launch.validate import recipe_path
    from ..runtime import ds_config
    from ..tune.search import parse_budget

    world = world_size_of(args.nproc, args.hostfile)
    budget = parse_budget(args.budget)
    recipe = recipe_path(args.config)
    cfg = build_config(recipe, list(args.overrides),
                       flags={"deepspeed_config": args.deepspeed_config} if args.deepspeed_config else None)
    ds_path = str(ds_config.resolve_path(cfg.deepspeed_config))
    base = ds_config.load_ds_json(ds_path)
    ds_config.prepare(ds_path, world, data=base)
    if args.memory_cap_mb is not None:  # nan and inf are refused too
        from ..core.fields import PositiveFloat, check_flag

        check_flag("--memory-cap-mb", args.memory_cap_mb, PositiveFloat)
    if args.out is not None:
        out = Path(args.out)
        if out.suffix != ".json":
            raise ConfigError(f"--out {args.out!r} must end in .json")
        if out.is_dir():
            raise ConfigError(f"--out {args.out!r} is a folder; give a FILE.json to write")
    target = Path(args.out).parent if args.out else Path("ds_configs") / "tuned"
    probe = next((p for p in [target, *target.parents] if p.exists()), Path("."))
    if not probe.is_dir():
        raise ConfigError(f"output path {str(target)!r} lies under the file {str(probe)!r}; choose another --out")
    if not os.access(probe, os.W_OK):
        raise ConfigError(f"output folder {str(probe)!r} is not writable; choose another --out")
    from ..tune.run import Inputs

    return Inputs(recipe=recipe, recipe_name=Path(recipe).stem if recipe else "default",
                  recipe_arg=args.config, sets=tuple(args.overrides),
                  ds_path=ds_path, base_json=base, nproc=args.nproc, hostfile=args.hostfile,
                  nodes=hostfile_nodes(args.hostfile), budget_s=budget,
                  allow_numerics_change=args.allow_numerics_change, allow_batch_change=args.allow_batch_change,
                  out=args.out, memory_cap_mb=args.memory_cap_mb, command=("dat-ds", "tune", *argv))


def start_ranks(argv: list[str], *, nproc: int, hostfile: str | None, env: dict[str, str] | None) -> str | None:
    """``tune.measure.StartRanks`` through the one launcher: None when the ranks exited cleanly, else why not."""
    from ..launch.launcher import RankFailure, launch
    from .ranks import TUNE_MODULE

    try:
        launch(TUNE_MODULE, argv, nproc=nproc, hostfile=hostfile, env=env)
    except RankFailure as e:
        return str(e) or f"the ranks exited with code {e.code}"
    return None


def _tune(args: argparse.Namespace, argv: list[str]) -> int:
    inputs = check_inputs(args, argv)
    from ..tune.run import run

    run(inputs, start_ranks)
    return 0


command("tune", "tune a recipe's DeepSpeed JSON for this hardware: micro-batch, ZeRO stage, layout, ... "
        "(timed real steps within --budget)")((_tune_args, _tune))
