"""``dat-ds``: the command line. Subcommands and their choices come from the registries.

User mistakes (``ConfigError``) print one line, ``error: <problem>; <fix>``, and exit with code 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Callable

from ..core.errors import ConfigError
from ..launch.launcher import add_launch_args, hostfile_nodes, launch, strip_launch_args

log = logging.getLogger("dat_ds.cli")
REPO_ROOT = Path(__file__).resolve().parents[2]
COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace, list[str]], int], str]] = {}


def command(name: str, help: str):
    def deco(fn_pair):
        COMMANDS[name] = (fn_pair[0], fn_pair[1], help)
        return fn_pair

    return deco


def resolve_recipe(path: str | None) -> str | None:
    """A recipe file path, or a bare recipe name (``cifar10_prn18_dat_pgd`` -> recipes/cifar10_prn18_dat_pgd.yaml)."""
    if path is None:
        return None
    p = Path(path)
    if not p.exists() and (REPO_ROOT / p).exists():
        return str(REPO_ROOT / p)
    named = REPO_ROOT / "recipes" / f"{path}.yaml"
    if not p.exists() and named.is_file():
        return str(named)
    return path


# ----------------------------------------------------------------------------- train


def _train_args(p: argparse.ArgumentParser) -> None:
    from ..launch.train import add_run_args

    add_run_args(p)
    add_launch_args(p)


def _preflight(args: argparse.Namespace, world: int) -> None:
    """Catch config mistakes in this process, before any rank starts, so they exit with code 2."""
    from ..runtime import ds_config
    from ..launch.train import check_run_dir, config_from_args

    cfg = config_from_args(args)
    ds_config.prepare(cfg.deepspeed_config, world)
    if not args.dry_run:
        check_run_dir(cfg, args.resume, args.overwrite)
        from ..launch.preflight import preflight

        preflight(cfg, args.resume, world)


def _train(args: argparse.Namespace, argv: list[str]) -> int:
    from ..launch import train

    if args.nproc < 1:
        raise ConfigError(f"--nproc={args.nproc} must be >= 1")
    args.config = resolve_recipe(args.config)
    if args.dry_run:  # validate for the requested world size; no process is started
        args.dry_run_world = args.nproc * hostfile_nodes(args.hostfile)
        train.main(args)
        return 0
    if args.nproc == 1 and not args.hostfile:
        train.main(args)
        return 0
    _preflight(args, args.nproc)
    forwarded = strip_launch_args(argv)
    if args.config:
        forwarded = _replace_value(forwarded, ("--config", "--recipe"), args.config)
    return launch("dat_ds.launch.train", forwarded, nproc=args.nproc, hostfile=args.hostfile,
                  master_port=args.master_port)


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


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nproc", type=int, default=2, help="ranks (default 2)")
    p.add_argument("--epochs", type=int, default=None, help="override the recipe's epoch count")
    p.add_argument("--output-dir", default="runs", help="where runs/<name>/ goes (default runs)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")


def _demo(args: argparse.Namespace, argv: list[str]) -> int:
    """DAT-PGD on the embedded Fashion-MNIST subset, small CNN, 2 ranks."""
    name = "demo"
    i = 1
    while (Path(args.output_dir) / name / "checkpoint").exists():
        i += 1
        name = f"demo-{i}"
    forwarded = ["--config", resolve_recipe("recipes/demo.yaml"), "--name", name, "--output-dir", args.output_dir]
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
            f"summary.json, curves.png, checkpoint/\n"
            f"evaluate it again:  uv run dat-ds eval --run {run_dir}\n"
            f"continue training:  uv run dat-ds train --config recipes/demo.yaml --name {name} --resume auto --epochs N"
        )
    return rc


command("demo", "DAT-PGD on the embedded Fashion-MNIST subset on 2 ranks (a few minutes on a laptop CPU)")((_demo_args, _demo))


# ----------------------------------------------------------------------------- list


def _list_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("what", nargs="?", default="all",
                   choices=["all", "attacks", "objectives", "models", "datasets", "optimizers"])


def _list(args: argparse.Namespace, argv: list[str]) -> int:
    from ..core import ui
    from ..attacks import ATTACKS
    from ..data import DATASETS
    from ..models import MODELS
    from ..objectives import OBJECTIVES
    from ..optim import OPTIMIZERS

    regs = {"attacks": ATTACKS, "objectives": OBJECTIVES, "models": MODELS, "datasets": DATASETS,
            "optimizers": OPTIMIZERS}
    rows = [(k, ", ".join(r.names())) for k, r in regs.items() if args.what in ("all", k)]
    ui.show(ui.table("registered components (models also accept any timm name)", ["name", "detail"], rows))
    return 0


command("list", "list registered attacks, objectives, models, data sets and optimizers")((_list_args, _list))


# ----------------------------------------------------------------------------- recipes


def recipe_rows() -> list[tuple[str, str, str, str]]:
    """(name, model / data, attack, published clean / robust accuracy) for every recipes/*.yaml."""
    import yaml

    rows = []
    for path in sorted((REPO_ROOT / "recipes").glob("*.yaml")):
        raw = yaml.safe_load(path.read_text()) or {}
        paper, attack = raw.get("paper") or {}, raw.get("attack") or {}
        clean, robust = paper.get("clean_acc"), paper.get("robust_acc")
        published = "-"
        if isinstance(clean, float) and isinstance(robust, float):
            published = f"{clean:.1%} / {robust:.1%} {paper.get('robust_attack', '')}".rstrip()
        rows.append((path.stem, f"{(raw.get('model') or {}).get('name', '-')} / {(raw.get('data') or {}).get('name', '-')}",
                     f"{attack.get('name', '-')} eps={attack.get('eps', '-')}", published))
    return rows


def _recipes(args: argparse.Namespace, argv: list[str]) -> int:
    from ..core import ui

    ui.show(ui.table("recipes/*.yaml (run: dat-ds train --recipe NAME --nproc N; validate: add --dry-run)",
                     ["recipe", "model / data", "attack", "paper clean / robust"], recipe_rows()))
    return 0


command("recipes", "list the benchmark recipes with their published numbers")((lambda p: None, _recipes))


def _load_extensions() -> None:
    """Subcommands contributed by other modules register themselves on import."""
    import importlib

    for mod in ("dat_ds.cli.eval", "dat_ds.bench.cli", "dat_ds.cli.ssl", "dat_ds.cli.export"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name is None or not mod.startswith(e.name):
                raise


def build_parser() -> argparse.ArgumentParser:
    _load_extensions()
    parser = argparse.ArgumentParser(prog="dat-ds", description="Distributed adversarial training on DeepSpeed")
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"dat-ds {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add, _, help_) in COMMANDS.items():
        add(sub.add_parser(name, help=help_, description=help_))
    return parser


def main(argv: list[str] | None = None) -> int:
    from ..launch.entry import run_entry

    argv = list(sys.argv[1:] if argv is None else argv)
    from ..core import dist

    dist.setup_logging()
    parser = build_parser()
    args = parser.parse_args(argv)
    _, run, _ = COMMANDS[args.command]
    return run_entry(lambda: run(args, argv[1:]) or 0)
