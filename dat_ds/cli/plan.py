"""``dat-ds plan``: registered on import by ``dat_ds.cli._load_extensions``.

Every argument is checked here, torch-free, before the model is traced: the recipe and its run config, the
DeepSpeed JSON's batch arithmetic for the GPU count, the memory size (``core.fields.parse_bytes``).
"""

from __future__ import annotations

import argparse
import json

from . import command
from .args import add_config_args


def _plan_args(p: argparse.ArgumentParser) -> None:
    add_config_args(p, required=True, ds_help="the JSON to plan (default: the recipe's); its optimizer and "
                                              "precision decide which ZeRO stages may run")
    p.add_argument("--gpus", type=int, default=8, help="GPUs per node (default 8)")
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1); ZeRO splits over gpus x nodes")
    p.add_argument("--gpu-memory", default="80GB",
                   help="memory per GPU: 80GB (80e9 bytes), 80GiB (80 x 2^30), 24GB ... (default 80GB)")
    p.add_argument("--micro-batches", default=None, metavar="LIST",
                   help="micro-batches to show, e.g. 32,64,128 (default: powers of two up to global batch / GPUs)")
    p.add_argument("--num-classes", type=int, default=1000,
                   help="classes of ImageFolder/HF data, which the plan does not read (default 1000)")
    p.add_argument("--cpu", action="store_true", help="predict a CPU run: no CUDA context/fragmentation allowance")
    p.add_argument("--json", action="store_true", help="print the plan as JSON instead of tables")


def check_inputs(args: argparse.Namespace):
    """The torch-free validation pass of ``plan``; returns ``tune.plan.PlanRequest``."""
    from pydantic_core import PydanticCustomError

    from ..core.config import build_config
    from ..core.errors import ConfigError
    from ..core.fields import parse_bytes
    from ..launch.validate import recipe_path
    from ..runtime import ds_config
    from ..tune.plan import PlanRequest

    for flag, value in (("--gpus", args.gpus), ("--nodes", args.nodes), ("--num-classes", args.num_classes)):
        if value < 1:
            raise ConfigError(f"{flag}={value} must be >= 1")
    try:
        capacity = parse_bytes(args.gpu_memory)
    except PydanticCustomError as e:
        raise ConfigError(f"--gpu-memory {args.gpu_memory!r} {e.message()}") from None
    world = args.gpus * args.nodes
    cfg = build_config(recipe_path(args.config), list(args.overrides),
                       flags={"deepspeed_config": args.deepspeed_config} if args.deepspeed_config else None)
    ds_path = str(ds_config.resolve_path(cfg.deepspeed_config))
    data = ds_config.load_ds_json(ds_path)
    settings = ds_config.prepare(ds_path, world, data=data)
    micros: tuple[int, ...] = ()
    if args.micro_batches:
        try:
            micros = tuple(sorted({int(m) for m in args.micro_batches.split(",") if m.strip()}))
        except ValueError:
            raise ConfigError(f"--micro-batches {args.micro_batches!r} must be a comma list of integers, "
                              "e.g. 32,64,128") from None
        for m in micros:
            if m < 1 or settings.global_batch % (m * world):
                raise ConfigError(f"--micro-batches: {m} x {world} GPUs does not divide the global batch "
                                  f"{settings.global_batch} into whole accumulation steps")
    return PlanRequest(cfg=cfg, ds_path=ds_path, ds_json=data, world=world, capacity=capacity, gpu=not args.cpu,
                       num_classes=args.num_classes, micro_batches=micros)


def _gb(n: int) -> str:
    return f"{n / 2**30:.2f}"


def show(plan, recipe: str, req) -> None:
    from ..core import ui
    from ..tune.plan import STAGES

    where = "GPU" if req.gpu else "CPU rank"
    parts = ["weights", "gradients", "optimizer", "buffers", "activations", "gathered_copy", "allowance"]
    for stage in STAGES:
        rows = [p for p in plan.predictions if p.stage == stage]
        if rows and rows[0].allowed:
            ui.console.print(f"[bold]ZeRO-{stage}[/bold]: not allowed for this JSON: {rows[0].allowed}")
            continue
        table = [[f"{p.micro} x {p.accum}", *(_gb(p.parts[k]) for k in parts), _gb(p.total),
                  "fits" if p.fits(plan.capacity) else "does not fit"] for p in rows]
        ui.show(ui.table(f"{recipe}: ZeRO-{stage}, {req.world} {where}(s), GiB per {where} "
                         f"(capacity {_gb(plan.capacity)} GiB)",
                         ["micro x accum", *parts, "total", f"vs {_gb(plan.capacity)} GiB"], table))
    best = plan.fastest()
    rule = "fastest = the lowest ZeRO stage that fits, then its largest micro-batch"
    if best is None:
        ui.console.print(f"[bold]nothing fits[/bold] in {_gb(plan.capacity)} GiB per {where} ({rule})")
    else:
        ui.console.print(f"[bold]fastest that fits[/bold]: ZeRO-{best.stage}, micro-batch {best.micro} x "
                         f"{best.accum} accumulation, {_gb(best.total)} GiB per {where} ({rule})")


def _plan(args: argparse.Namespace, argv: list[str]) -> int:
    req = check_inputs(args)
    from ..tune.plan import plan_recipe

    plan = plan_recipe(req)
    if args.json:
        print(json.dumps({"recipe": args.config, "world": req.world, **plan.to_json()}, indent=1))
    else:
        show(plan, args.config, req)
    return 0


command("plan", "predict a recipe's memory per GPU for each ZeRO stage and micro-batch, without a GPU, and name "
        "the fastest setting that fits")((_plan_args, _plan))
