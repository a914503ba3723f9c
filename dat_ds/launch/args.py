"""Every command's arguments, torch-free: the CLI (``dat-ds ...``) and the rank entries parse the same way.

``add_run_args`` is ``dat-ds train`` (and ``python -m dat_ds.train``); ``add_eval_args`` /
``check_eval_args`` are ``dat-ds eval`` (and ``python -m dat_ds.launch.evaluate``). Choices come from
the static names in ``core/names.py``, so ``--help`` and a bad value never import torch.
"""

from __future__ import annotations

import argparse

from ..core import names
from ..core.config import parse_eps
from ..core.errors import ConfigError

__all__ = ["add_config_args", "add_eval_args", "add_run_args", "check_eval_args", "check_master_port", "check_protocol", "eval_args_parser",
           "eval_attacks", "parse_eps", "train_args_parser"]

EVAL_ATTACKS = tuple(n for n in names.ATTACKS if n != "none")


def add_config_args(parser: argparse.ArgumentParser, *, required: bool = False,
                    recipe_help: str = "recipe YAML or a shipped recipe's name (`dat-ds recipes` lists them)",
                    ds_help: str = "DeepSpeed JSON or a shipped one's name, e.g. zero2_fp32; overrides the recipe's",
                    set_help: str = "override a config key, e.g. --set attack.eps=0.1 (repeatable)") -> None:
    """The recipe, the DeepSpeed JSON and the ``--set`` overrides: every command that builds a run config."""
    parser.add_argument("--config", "--recipe", dest="config", default=None, required=required, help=recipe_help)
    parser.add_argument("--deepspeed_config", "--ds-config", dest="deepspeed_config", default=None, help=ds_help)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=set_help)


def add_run_args(parser: argparse.ArgumentParser) -> None:
    add_config_args(parser)
    parser.add_argument("--name", default=None, help="run name: outputs go to <output_dir>/<name>/")
    parser.add_argument("--epochs", type=int, default=None, help="shortcut for --set train.epochs=N")
    parser.add_argument("--output-dir", default=None, help="shortcut for --set output_dir=DIR")
    parser.add_argument("--resume", default=None, metavar="auto|DIR",
                        help="continue from the newest complete checkpoint of this run (auto) or of DIR")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing run folder of the same name")
    parser.add_argument("--allow-world-size-change", action="store_true",
                        help="with --resume: continue a checkpoint saved on another number of ranks (data position "
                             "re-sharded, per-rank RNG re-seeded: not bit-identical)")
    parser.add_argument("--dry-run", action="store_true", help="validate the configs and exit")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="allow legacy pickle data files (they can run code when loaded; only for files you trust)")


def train_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="dat-ds distributed adversarial training", add_help=True)
    add_run_args(parser)
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the DeepSpeed launcher
    return parser


def add_eval_args(p: argparse.ArgumentParser) -> None:
    src = p.add_argument_group("what to evaluate (either --run, or --weights with --model and --data)")
    src.add_argument("--run", default=None, help="run folder (runs/<name>), its checkpoint/ folder or one tag folder")
    src.add_argument("--tag", default=None,
                     help="checkpoint tag (default: the run's best one when train.keep_best kept one, else the newest)")
    src.add_argument("--weights", default=None, help="timm/torch state dict (.pt/.pth) or .safetensors file; with "
                     "--run: ema or raw, which of the run's weights (default: the weight EMA when the run has one)")
    src.add_argument("--model", default=None, help="model name for --weights (registered or timm)")
    src.add_argument("--data", default=None, help="data set name for --weights (default: the run's, or fashion-mnist)")
    src.add_argument("--data-root", default=None, help="data.root for on-disk data sets")
    p.add_argument("--attacks", default="pgd", help=f"comma list from: {', '.join(EVAL_ATTACKS)}")
    p.add_argument("--eps", default=None, help="comma list, fractions allowed (8/255); default: the run's attack.eps")
    p.add_argument("--norm", default="linf", choices=["linf", "l2"])
    p.add_argument("--steps", type=int, default=20, help="PGD steps (step size 2.5*eps/steps)")
    p.add_argument("--restarts", type=int, default=1, help="PGD restarts (worst case per example)")
    p.add_argument("--loss", default="ce", choices=list(names.ATTACK_LOSSES), help="PGD/FGSM loss")
    p.add_argument("--aa-steps", type=int, default=100,
                   help="APGD/APGD-T/FAB-T iterations inside autoattack (reference 100; 10 for a quick look)")
    p.add_argument("--aa-queries", type=int, default=5000, help="Square queries inside autoattack (reference 5000)")
    p.add_argument("--apgd-steps", type=int, default=100, help="iterations for apgd-ce / apgd-dlr")
    p.add_argument("--square-queries", type=int, default=1000, help="queries of the square attack")
    p.add_argument("--max-examples", type=int, default=None, help="evaluate the first N test examples")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0, help="seeds every batch's attack noise")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per rank (default: cores / ranks); fix it to compare runs bit for bit")
    p.add_argument("--sanity", action="store_true", help="also run the gradient-masking checks")
    p.add_argument("--out", default=None, help="output folder (default: the run folder, else ./eval_out)")
    rb = p.add_argument_group("RobustBench protocol")
    rb.add_argument("--protocol", default=None, choices=list(EVAL_PROTOCOLS),
                    help="robustbench: standard AutoAttack on the whole test set (or --subset-file), a determinism "
                    "check, and robustbench.json in RobustBench's model_info fields")
    rb.add_argument("--subset-file", default=None, help="test-set indices to score (whitespace/comma separated); "
                    "RobustBench's fixed 5,000-image ImageNet list must be supplied (it is not shipped)")
    rb.add_argument("--entry-name", default=None, help="the entry's name (default: the run or weights file name)")


EVAL_PROTOCOLS = ("robustbench",)
ROBUSTBENCH_AA = {"aa_steps": 100, "aa_queries": 5000}  # standard AutoAttack (Croce & Hein 2020)


def check_protocol(args: argparse.Namespace) -> None:
    """``--protocol robustbench``: standard AutoAttack only, one eps; sets ``args.attacks``. One-line errors."""
    if getattr(args, "protocol", None) != "robustbench":
        for flag in ("subset_file", "entry_name"):
            if getattr(args, flag, None) is not None:
                raise ConfigError(f"--{flag.replace('_', '-')} belongs to --protocol robustbench; add it or drop the flag")
        return
    if args.attacks.replace(" ", "") not in ("pgd", "autoattack"):  # pgd: the flag's default, left alone
        raise ConfigError(f"--protocol robustbench runs standard AutoAttack only; drop --attacks {args.attacks}")
    for key, value in ROBUSTBENCH_AA.items():
        if getattr(args, key) != value:
            raise ConfigError(f"--protocol robustbench uses standard AutoAttack ({value} for --{key.replace('_', '-')}); "
                              f"drop --{key.replace('_', '-')} {getattr(args, key)}")
    if args.eps is not None and len(parse_eps(args.eps)) != 1:
        raise ConfigError(f"--protocol robustbench scores one eps; give one (--eps 8/255), not {args.eps}")
    if args.subset_file is not None:
        from pathlib import Path

        if not Path(args.subset_file).is_file():
            raise ConfigError(f"--subset-file {args.subset_file!r} not found; give a text file of test-set indices")
    args.attacks = "autoattack"


def eval_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="dat-ds robust evaluation (one rank of it)")
    add_eval_args(p)
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the DeepSpeed launcher
    return p


def eval_attacks(text: str) -> list[str]:
    """``"pgd, autoattack"`` -> the attack names, each checked against the registered evaluation attacks."""
    out = [a.strip() for a in text.split(",") if a.strip()]
    if not out:
        raise ConfigError("--attacks is empty; give e.g. --attacks pgd,autoattack")
    for name in out:
        if name not in EVAL_ATTACKS and name not in names.PLUGINS["attack"]:
            raise ConfigError(names.unknown_message("attack", name, [*EVAL_ATTACKS, *names.PLUGINS["attack"]]))
    return out


def check_master_port(port: int | None) -> None:
    """``--master-port`` (None: the launcher picks a free one) is a TCP port number."""
    if port is not None and not 1 <= port <= 65535:
        raise ConfigError(f"--master-port={port} is not a TCP port; use 1..65535 (or leave it out for a free one)")


RUN_WEIGHTS = ("ema", "raw")  # `dat-ds eval --run R --weights ema|raw`: the weight EMA or the raw weights


def check_eval_args(args: argparse.Namespace) -> None:
    """Every ``dat-ds eval`` argument the command line alone can check; one-line ConfigError otherwise."""
    check_master_port(getattr(args, "master_port", None))  # only the launching process has it
    if args.run is None and args.weights is None:
        raise ConfigError("nothing to evaluate; pass --run runs/<name>, or --weights FILE --model NAME --data NAME")
    run_weights = args.run is not None and args.weights in RUN_WEIGHTS  # which of the run's weights
    if args.run is not None and args.weights is not None and not run_weights:
        raise ConfigError("with --run, --weights is ema or raw (which of the run's weights); evaluate a weights "
                          "file without --run: --weights FILE --model NAME --data NAME")
    if args.weights is not None and not run_weights and not args.model:
        raise ConfigError("--weights needs --model NAME (e.g. --model small_cnn or a timm name)")
    for key in ("steps", "restarts", "batch_size", "aa_steps", "aa_queries", "apgd_steps", "square_queries"):
        if getattr(args, key) < 1:
            raise ConfigError(f"--{key.replace('_', '-')}={getattr(args, key)} must be >= 1")
    if args.max_examples is not None and args.max_examples < 1:
        raise ConfigError(f"--max-examples={args.max_examples} must be >= 1")
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads={args.threads} must be >= 1")
    check_protocol(args)
    eval_attacks(args.attacks)
    if args.data is not None:
        names.check("data set", args.data)
    if args.eps is not None:
        eps = parse_eps(args.eps)
        if args.norm == "linf" and max(eps) > 1:
            raise ConfigError(f"--eps {max(eps)} is above 1; L-inf eps is in pixel units of [0, 1] images, e.g. 8/255")
    from pathlib import Path

    if args.run is not None and not Path(args.run).exists():
        raise ConfigError(f"--run {args.run!r} does not exist; give a run folder such as runs/demo")
    if args.weights is not None and not run_weights and not Path(args.weights).is_file():
        raise ConfigError(f"--weights {args.weights!r} not found; give a local .safetensors or .pt file")
    if args.out is not None and Path(args.out).exists() and not Path(args.out).is_dir():
        raise ConfigError(f"--out {args.out!r} is a file; give a folder for eval.json and the plot")
