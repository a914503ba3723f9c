"""Every command's arguments, torch-free, and the requests they become: the CLI (``dat-ds ...``) and the
rank entries (``dat_ds.train``, ``dat_ds.evaluate``) parse the same way.

``add_run_args`` is ``dat-ds train`` (and ``python -m dat_ds.train``), turned into a ``TrainRequest`` by
``train_request``; ``add_eval_args`` is ``dat-ds eval`` (and ``python -m dat_ds.evaluate``), turned into an
``EvalRequest`` by ``eval_request``. Nothing below ``cli/`` sees a Namespace; ``launch.validate`` checks
the requests. Choices come from the static names in ``core/names.py``, so ``--help`` and a bad value never
import torch.
"""

from __future__ import annotations

import argparse

from ..core import names
from ..core.requests import EvalRequest, TrainRequest, TuneWorkerRequest

__all__ = ["add_config_args", "add_eval_args", "add_launch_args", "add_run_args", "eval_args_parser", "eval_request",
           "train_args_parser", "train_request", "tune_worker_args_parser", "tune_worker_request"]


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
    parser.add_argument("--ds-set", dest="ds_overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a DeepSpeed JSON key, e.g. --ds-set optimizer.params.lr=0.2 (repeatable)")
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
    p.add_argument("--attacks", default=EvalRequest.attacks, help=f"comma list from: {', '.join(names.EVAL_ATTACKS)}")
    p.add_argument("--eps", default=None, help="comma list, fractions allowed (8/255); default: the run's attack.eps")
    p.add_argument("--norm", default=EvalRequest.norm, choices=["linf", "l2"])
    p.add_argument("--steps", type=int, default=EvalRequest.steps, help="PGD steps (step size 2.5*eps/steps)")
    p.add_argument("--restarts", type=int, default=EvalRequest.restarts, help="PGD restarts (worst case per example)")
    p.add_argument("--loss", default=EvalRequest.loss, choices=list(names.ATTACK_LOSSES), help="PGD/FGSM loss")
    p.add_argument("--aa-steps", type=int, default=EvalRequest.aa_steps,
                   help="APGD/APGD-T/FAB-T iterations inside autoattack (reference 100; 10 for a quick look)")
    p.add_argument("--aa-queries", type=int, default=EvalRequest.aa_queries,
                   help="Square queries inside autoattack (reference 5000)")
    p.add_argument("--apgd-steps", type=int, default=EvalRequest.apgd_steps, help="iterations for apgd-ce / apgd-dlr")
    p.add_argument("--square-queries", type=int, default=EvalRequest.square_queries, help="queries of the square attack")
    p.add_argument("--max-examples", type=int, default=None, help="evaluate the first N test examples")
    p.add_argument("--batch-size", type=int, default=EvalRequest.batch_size)
    p.add_argument("--seed", type=int, default=EvalRequest.seed, help="seeds every batch's attack noise")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per rank (default: cores / ranks); fix it to compare runs bit for bit")
    p.add_argument("--sanity", action="store_true", help="also run the gradient-masking checks")
    p.add_argument("--per-class", action="store_true", help="also print each class's clean and robust accuracy "
                   "(eval.json always has them)")
    p.add_argument("--out", default=None, help="output folder (default: the run folder, else ./eval_out)")
    rb = p.add_argument_group("RobustBench protocol")
    rb.add_argument("--protocol", default=None, choices=list(names.EVAL_PROTOCOLS),
                    help="robustbench: standard AutoAttack on the whole test set (or --subset-file), a determinism "
                    "check, and robustbench.json in RobustBench's model_info fields")
    rb.add_argument("--subset-file", default=None, help="test-set indices to score (whitespace/comma separated); "
                    "RobustBench's fixed 5,000-image ImageNet list must be supplied (it is not shipped)")
    rb.add_argument("--entry-name", default=None, help="the entry's name (default: the run or weights file name)")


def eval_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="dat-ds robust evaluation (one rank of it)")
    add_eval_args(p)
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the DeepSpeed launcher
    return p


def train_request(args: argparse.Namespace) -> TrainRequest:
    """``add_run_args``' arguments as the request ``launch.train.main`` takes."""
    return TrainRequest(config=args.config, deepspeed_config=args.deepspeed_config, overrides=tuple(args.overrides),
                        name=args.name, epochs=args.epochs, output_dir=args.output_dir, resume=args.resume,
                        overwrite=args.overwrite, allow_world_size_change=args.allow_world_size_change,
                        dry_run=args.dry_run, trust_pickle=args.trust_pickle, ds_overrides=tuple(args.ds_overrides))


def eval_request(args: argparse.Namespace) -> EvalRequest:
    """``add_eval_args``' arguments as the request ``launch.evaluate.main`` takes (checked there)."""
    return EvalRequest(run=args.run, tag=args.tag, weights=args.weights, model=args.model, data=args.data,
                       data_root=args.data_root, attacks=args.attacks, eps=args.eps, norm=args.norm, steps=args.steps,
                       restarts=args.restarts, loss=args.loss, aa_steps=args.aa_steps, aa_queries=args.aa_queries,
                       apgd_steps=args.apgd_steps, square_queries=args.square_queries,
                       max_examples=args.max_examples, batch_size=args.batch_size, seed=args.seed,
                       threads=args.threads, sanity=args.sanity, per_class=args.per_class, out=args.out,
                       protocol=args.protocol,
                       subset_file=args.subset_file, entry_name=args.entry_name)


def add_launch_args(p: argparse.ArgumentParser, default_nproc: int = 1) -> None:
    """The launching command's own flags (``launch.launcher.strip_launch_args`` keeps them from the ranks)."""
    p.add_argument("--nproc", "--num_gpus", "--num-gpus", dest="nproc", type=int, default=default_nproc,
                   help=f"processes (ranks) per node (default {default_nproc}); --num_gpus as the deepspeed launcher says it")
    p.add_argument("--hostfile", default=None, help="DeepSpeed hostfile for several nodes ('host slots=N' lines)")
    p.add_argument("--master-port", type=int, default=None, help="rendezvous port (default: a free one)")


def tune_worker_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="measuring ranks of dat-ds tune (started by launch())")
    p.add_argument("--exchange", required=True, help="folder of req-<n>.json / res-<n>.json")
    p.add_argument("--recipe", default=None)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the DeepSpeed launcher
    return p


def tune_worker_request(args: argparse.Namespace) -> TuneWorkerRequest:
    return TuneWorkerRequest(exchange=args.exchange, recipe=args.recipe, overrides=tuple(args.overrides))
