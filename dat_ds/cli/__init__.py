"""``dat-ds``: the command line. Argparse only: ``--help`` and any one-line config error import no torch.

Each subcommand's run function imports the heavy parts when it needs them, after the torch-free half of
the one validation pass (``launch.validate``) has checked every input. User mistakes (``ConfigError``)
print one line, ``error: <problem>; <fix>``, and exit with code 2 (``launch.entry.run_entry``).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Callable

from ..core import names
from ..launch.launcher import check_master_port, launch, strip_launch_args, world_size_of

COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace, list[str]], int], str]] = {}
VERBOSE_FLAGS = ("-v", "--verbose")


def command(name: str, help: str):
    def deco(fn_pair):
        COMMANDS[name] = (fn_pair[0], fn_pair[1], help)
        return fn_pair

    return deco


def resolve_recipe(path: str | None) -> str | None:
    """A recipe file path, or a shipped recipe's name (``cifar10_prn18_dat_pgd``, ``recipes/demo.yaml``)."""
    from ..launch.validate import recipe_path

    return recipe_path(path)


# ----------------------------------------------------------------------------- train


def _train_args(p: argparse.ArgumentParser) -> None:
    from .args import add_launch_args, add_run_args

    add_run_args(p)
    add_launch_args(p)


def _train(args: argparse.Namespace, argv: list[str], *, needs_unlabeled_objective: bool = False) -> int:
    from dataclasses import replace

    from ..launch import train, validate
    from .args import train_request
    from .ranks import TRAIN_MODULE

    world = world_size_of(args.nproc, args.hostfile)
    request = train_request(args)
    request = replace(request, config=resolve_recipe(request.config))
    check_master_port(args.master_port)  # the launching process's own flag; the ranks never see it
    if request.dry_run or (args.nproc == 1 and not args.hostfile):
        if needs_unlabeled_objective:
            validate.train_inputs(request, world, needs_unlabeled_objective=True)
        train.main(request, world=world)  # the whole pass, then (without --dry-run) training in this process
        return 0
    # The validation pass in this process, before any rank starts: torch-free half, then the heavy one.
    cfg, _ = validate.train_inputs(request, world, needs_unlabeled_objective=needs_unlabeled_objective)
    from ..launch import runlock

    runlock.check_free(cfg.run_dir)  # a live run on this folder: refused before any rank starts
    import socket

    from ..launch.preflight import DECODED_ENV, preflight

    preflight(cfg, request.resume, world, nproc=None if args.hostfile else args.nproc,  # not ours to count: a hostfile's nodes
              allow_world_size_change=request.allow_world_size_change)
    forwarded = strip_launch_args(argv)
    if request.config:
        forwarded = _replace_value(forwarded, ("--config", "--recipe"), request.config)
    from ..core.stop import signal_numbers
    from ..runtime.checkpoint import damage_named_env  # torch: the preflight has loaded it

    stop_signals = signal_numbers(cfg.train.stop_signals) if cfg.train.save_on_signal else frozenset()
    started = time.time()
    try:
        return launch(TRAIN_MODULE, forwarded, nproc=args.nproc, hostfile=args.hostfile,
                      master_port=args.master_port, checkpoint_root=cfg.run_dir / "checkpoint",
                      # this preflight decoded the images and named any damaged checkpoint: ranks here do neither again
                      env={DECODED_ENV: socket.gethostname(), **damage_named_env()},
                      stop_signals=stop_signals)  # SIGUSR1 ...: passed on to the ranks, which save, then stop
    except BaseException:  # a rank failed or the run was interrupted; on one node every rank is gone now
        if not args.hostfile:  # rank 0 owns the lock; if it died without cleaning up, clean up after it
            dead = runlock.clear_dead(cfg.run_dir, started)
            if dead is not None:
                train.settle_leftovers(cfg.run_dir, dead)
        raise


def _replace_value(argv: list[str], flags: tuple[str, ...], value: str) -> list[str]:
    out = list(argv)
    for i, a in enumerate(out):
        if a in flags and i + 1 < len(out):
            out[i + 1] = value
        elif a.split("=", 1)[0] in flags:
            out[i] = f"{a.split('=', 1)[0]}={value}"
    return out


command("train", "adversarially train a model (DeepSpeed; --nproc N ranks, --hostfile for nodes)")((_train_args, _train))


# ----------------------------------------------------------------------------- demo


DEMO_RECIPE = "demo_fast"  # what `dat-ds demo` trains (the DAT-PGD-5 demo before issue 18: "demo")


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nproc", type=int, default=2, help="ranks (default 2)")
    p.add_argument("--epochs", type=int, default=None, help="override the recipe's epoch count")
    p.add_argument("--output-dir", default="runs", help="where runs/<name>/ goes (default runs)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")


def _demo(args: argparse.Namespace, argv: list[str]) -> int:
    """``recipes/demo_fast.yaml`` on 2 ranks: N-FGSM AT with one-cycle LR, small CNN, embedded Fashion-MNIST.

    The fastest method of ``dat-ds bench time-to-robust`` whose AutoAttack accuracy stays within 1 pp of
    the DAT-PGD-5 demo's (``recipes/demo.yaml``, still ``dat-ds train --recipe demo``); README, "What the
    demo does"."""
    from ..launch.runlock import lock_path

    name = "demo"
    i = 1
    while (Path(args.output_dir) / name / "checkpoint").exists() or lock_path(Path(args.output_dir) / name).exists():
        i += 1
        name = f"demo-{i}"
    forwarded = ["--config", resolve_recipe(DEMO_RECIPE), "--name", name, "--output-dir", args.output_dir]
    if args.epochs is not None:
        forwarded += ["--epochs", str(args.epochs)]
    for o in args.overrides:
        forwarded += ["--set", o]
    parser = argparse.ArgumentParser()
    _train_args(parser)
    train_args = parser.parse_args(forwarded + ["--nproc", str(args.nproc)])
    rc = _train(train_args, forwarded)
    if rc == 0:
        run_dir = Path(args.output_dir) / name
        from ..core import ui

        ui.console.print(
            f"\n[bold]done.[/bold] outputs in {run_dir}/: config.yaml, ds_config.json, metrics.jsonl, "
            f"summary.json, curves.png, adv_examples.png, checkpoint/\n"
            f"evaluate it again:  dat-ds eval --run {run_dir}\n"
            f"continue training:  dat-ds train --recipe {DEMO_RECIPE} --name {name} --output-dir {args.output_dir} "
            "--resume auto --epochs N"
        )
    return rc


command("demo", "fast adversarial training (N-FGSM, one-cycle LR) of a small CNN on the embedded Fashion-MNIST "
        "subset on 2 ranks (about a minute on a laptop CPU)")((_demo_args, _demo))


# ----------------------------------------------------------------------------- list

LISTS = {"attacks": names.ATTACKS, "objectives": names.OBJECTIVES, "models": names.MODELS, "datasets": names.DATASETS,
         "optimizers": names.OPTIMIZERS, "norms": names.NORMS, "losses": names.ATTACK_LOSSES}


def _list_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("what", nargs="?", default="all", choices=["all", *LISTS])


def _list(args: argparse.Namespace, argv: list[str]) -> int:
    from ..core import ui

    rows = [(k, ", ".join(v)) for k, v in LISTS.items() if args.what in ("all", k)]
    ui.show(ui.table("registered components (models also accept any timm name)", ["name", "detail"], rows))
    return 0


command("list", "list registered attacks, objectives, models, data sets, optimizers, norms and attack losses")(
    (_list_args, _list))


# ----------------------------------------------------------------------------- recipes


def recipe_rows() -> list[tuple[str, str, str, str]]:
    """(name, model / data, attack, published clean / robust accuracy) for every shipped recipe."""
    import yaml

    from ..core import resources

    rows = []
    for stem in resources.names(resources.RECIPES):
        raw = yaml.safe_load(resources.packaged(resources.RECIPES, stem).read_text()) or {}
        paper, attack = raw.get("paper") or {}, raw.get("attack") or {}
        clean, robust = paper.get("clean_acc"), paper.get("robust_acc")
        published = "-"
        if isinstance(clean, float) and isinstance(robust, float):
            published = f"{clean:.1%} / {robust:.1%} {paper.get('robust_attack', '')}".rstrip()
        rows.append((stem, f"{(raw.get('model') or {}).get('name', '-')} / {(raw.get('data') or {}).get('name', '-')}",
                     f"{attack.get('name', '-')} eps={attack.get('eps', '-')}", published))
    return rows


def _recipes(args: argparse.Namespace, argv: list[str]) -> int:
    from ..core import ui

    ui.show(ui.table("recipes (run: dat-ds train --recipe NAME --nproc N; validate: add --dry-run)",
                     ["recipe", "model / data", "attack", "paper clean / robust"], recipe_rows()))
    return 0


command("recipes", "list the shipped recipes with their published numbers")((lambda p: None, _recipes))


def _load_extensions() -> None:
    """Subcommands defined in sibling modules register themselves on import (argparse only, no torch)."""
    import importlib

    for mod in ("dat_ds.cli.eval", "dat_ds.cli.bench", "dat_ds.cli.ssl", "dat_ds.cli.export", "dat_ds.cli.tune",
                "dat_ds.cli.plan", "dat_ds.cli.verify"):
        importlib.import_module(mod)


def _add_verbose(p: argparse.ArgumentParser, default=argparse.SUPPRESS) -> None:
    """``-v`` before or after the subcommand; the subcommand's flag has no default of its own (SUPPRESS), so
    it never overwrites the main parser's ``verbose`` (False unless given)."""
    p.add_argument(*VERBOSE_FLAGS, dest="verbose", action="store_true", default=default,
                   help="show DeepSpeed's start-up messages and debug logs")


def build_parser() -> argparse.ArgumentParser:
    _load_extensions()
    parser = argparse.ArgumentParser(prog="dat-ds", description="Distributed adversarial training on DeepSpeed")
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"dat-ds {__version__}")
    _add_verbose(parser, default=False)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add, _, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        add(p)
        _add_verbose(p)
    return parser


def _command_argv(argv: list[str], command_name: str) -> list[str]:
    """The arguments after the subcommand's name, without -v/--verbose (the ranks get it via the env)."""
    rest = argv[argv.index(command_name) + 1:] if command_name in argv else argv[1:]
    return [a for a in rest if a not in VERBOSE_FLAGS]


def main(argv: list[str] | None = None) -> int:
    from ..launch.entry import run_entry

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verbose:
        os.environ["DAT_DS_VERBOSE"] = "1"  # inherited by the ranks the command starts
    from ..core import dist
    from ..core.provenance import COMMAND_ENV

    dist.setup_logging()
    _, run, _ = COMMANDS[args.command]
    previous = os.environ.get(COMMAND_ENV)
    os.environ[COMMAND_ENV] = shlex.join(["dat-ds", *argv])  # this command's runs and ranks record it (summary.json)
    try:
        return run_entry(lambda: run(args, _command_argv(argv, args.command)) or 0)
    finally:  # an in-process caller's next command is not this one
        if previous is None:
            os.environ.pop(COMMAND_ENV, None)
        else:
            os.environ[COMMAND_ENV] = previous
