"""``dat-ds eval``: robust accuracy of a checkpoint under a list of attacks and eps values, on N ranks.

Module entry for every rank (``dat-ds eval --nproc 2`` starts it through the DeepSpeed launcher, or run
``deepspeed --num_gpus 2 --module dat_ds.launch.evaluate --run runs/demo`` yourself). The test set is
sharded over ranks batch by batch, each batch's attack noise is seeded by its index, and per-example
results are gathered, so ``eval.json`` is the same for any number of ranks. Rank 0 writes the outputs.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import time
from pathlib import Path
from typing import Any

import torch

from ..core import dist, ui
from ..attacks import ATTACK_LOSSES, ATTACKS
from ..data import build_dataset
from .evaluate import AttackSpec, EvalResult, evaluate
from ..core.errors import ConfigError
from ..core.io import atomic_write_json, save_figure
from . import sanity
from .loading import LoadedModel, load_run, load_weights

log = logging.getLogger("dat_ds.eval")
EVAL_JSON = "eval.json"
PLOT = "robust_acc_vs_eps.png"


def parse_eps(text: str) -> list[float]:
    """``"0.05,0.1"`` or ``"2/255,8/255"`` -> floats in [0, 1] (L-inf) or >= 0 (L2)."""
    out = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            num, _, den = item.partition("/")
            value = float(num) / float(den) if den else float(num)
        except (ValueError, ZeroDivisionError):
            raise ConfigError(f"--eps item {item!r} is not a number; use e.g. --eps 0.1,8/255") from None
        if value < 0:
            raise ConfigError(f"--eps {item} is negative; eps is a radius >= 0")
        out.append(value)
    if not out:
        raise ConfigError("--eps is empty; give at least one value, e.g. --eps 0.1")
    return out


def add_eval_args(p: argparse.ArgumentParser) -> None:
    src = p.add_argument_group("what to evaluate (either --run, or --weights with --model and --data)")
    src.add_argument("--run", default=None, help="run folder (runs/<name>), its checkpoint/ folder or one tag folder")
    src.add_argument("--tag", default=None, help="checkpoint tag (default: the newest complete one)")
    src.add_argument("--weights", default=None, help="timm/torch state dict (.pt/.pth) or .safetensors file")
    src.add_argument("--model", default=None, help="model name for --weights (registered or timm)")
    src.add_argument("--data", default=None, help="data set name for --weights (default: the run's, or fashion-mnist)")
    src.add_argument("--data-root", default=None, help="data.root for on-disk data sets")
    p.add_argument("--attacks", default="pgd", help=f"comma list from: {', '.join(n for n in ATTACKS.names() if n != 'none')}")
    p.add_argument("--eps", default=None, help="comma list, fractions allowed (8/255); default: the run's attack.eps")
    p.add_argument("--norm", default="linf", choices=["linf", "l2"])
    p.add_argument("--steps", type=int, default=20, help="PGD steps (step size 2.5*eps/steps)")
    p.add_argument("--restarts", type=int, default=1, help="PGD restarts (worst case per example)")
    p.add_argument("--loss", default="ce", choices=ATTACK_LOSSES.names(), help="PGD/FGSM loss")
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


def build_specs(args: argparse.Namespace, eps_list: list[float]) -> list[AttackSpec]:
    specs = []
    for name in [a.strip() for a in args.attacks.split(",") if a.strip()]:
        if name not in ATTACKS or name == "none":
            raise ConfigError(f"unknown attack {name!r}; choose from {', '.join(n for n in ATTACKS.names() if n != 'none')}")
        extra: dict[str, Any] = {}
        if name == "autoattack" and args.aa_steps != 100:
            extra["aa_steps"] = args.aa_steps
        if name == "autoattack" and args.aa_queries != 5000:
            extra["n_queries"] = args.aa_queries
        if name in ("apgd-ce", "apgd-dlr") and args.apgd_steps != 100:
            extra["apgd_steps"] = args.apgd_steps
        if name == "square":
            extra["n_queries"] = args.square_queries
        pgd_like = name == "pgd"
        for eps in eps_list:
            specs.append(AttackSpec(attack=name, eps=eps, steps=args.steps if pgd_like else 1,
                                    restarts=args.restarts if name in ("pgd", "apgd-ce", "apgd-dlr") else 1,
                                    norm=args.norm, loss=args.loss, extra=extra))
    if not specs:
        raise ConfigError("--attacks is empty; give e.g. --attacks pgd,autoattack")
    return specs


def check_args(args: argparse.Namespace) -> None:
    if args.run is None and args.weights is None:
        raise ConfigError("nothing to evaluate; pass --run runs/<name>, or --weights FILE --model NAME --data NAME")
    if args.run is not None and args.weights is not None:
        raise ConfigError("pass either --run or --weights, not both")
    if args.weights is not None and not args.model:
        raise ConfigError("--weights needs --model NAME (e.g. --model small_cnn or a timm name)")
    for key in ("steps", "restarts", "batch_size"):
        if getattr(args, key) < 1:
            raise ConfigError(f"--{key.replace('_', '-')}={getattr(args, key)} must be >= 1")
    if args.max_examples is not None and args.max_examples < 1:
        raise ConfigError(f"--max-examples={args.max_examples} must be >= 1")
    if args.eps is not None:
        eps = parse_eps(args.eps)
        if args.norm == "linf" and max(eps) > 1:
            raise ConfigError(f"--eps {max(eps)} is above 1; L-inf eps is in pixel units of [0, 1] images, e.g. 8/255")


def _bits(t: torch.Tensor) -> str:
    return "".join("1" if v else "0" for v in t.tolist())


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(_bits(t).encode()).hexdigest()


def build_report(result: EvalResult, specs: list[AttackSpec], source: dict[str, Any], args: argparse.Namespace,
                 checks: list[sanity.Check] | None, seconds: float) -> dict[str, Any]:
    rows = []
    for spec in specs:
        correct = result.robust_correct[spec.label]
        rows.append({"attack": spec.attack, "label": spec.label, "eps": spec.eps, "norm": spec.norm,
                     "steps": spec.steps, "restarts": spec.restarts, "loss": spec.loss, "extra": spec.extra,
                     "clean_acc": result.clean_acc, "robust_acc": result.robust_acc(spec.label),
                     "count": result.count, "seconds": result.seconds[spec.label],
                     "correct_sha256": _sha(correct), "correct": _bits(correct)})
    return {
        "source": source, "world_size": dist.world_size(), "seed": args.seed, "batch_size": args.batch_size,
        "max_examples": args.max_examples, "count": result.count, "clean_acc": result.clean_acc,
        "clean_correct_sha256": _sha(result.clean_correct), "clean_correct": _bits(result.clean_correct),
        "results": rows, "sanity": [c.to_dict() for c in checks] if checks is not None else None,
        "seconds": seconds, "machine_note": "seconds are the slowest rank's attack time",
    }


def plot_curves(report: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: dict[str, list[tuple[float, float]]] = {}
    for row in report["results"]:
        name = row["label"].rsplit("@", 1)[0]
        curves.setdefault(name, []).append((row["eps"], row["robust_acc"]))
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name, pts in curves.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.axhline(report["clean_acc"], color="grey", linestyle="--", label="clean")
    ax.set(xlabel="eps", ylabel="robust accuracy", ylim=(0, 1), title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def load_model(args: argparse.Namespace) -> LoadedModel:
    if args.run is not None:
        return load_run(args.run, args.tag)
    return load_weights(args.weights, args.model, args.data or "fashion-mnist", args.data_root)


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate on this process's rank (the world may be 1). Returns the report on every rank."""
    dist.setup_logging()
    check_args(args)
    dist.init_distributed()
    if args.threads:
        torch.set_num_threads(args.threads)
    else:
        dist.set_threads_per_rank()
    loaded = load_model(args)
    if args.data and args.run is not None:
        from dataclasses import replace

        loaded.data_cfg = replace(loaded.data_cfg, name=args.data, root=args.data_root or loaded.data_cfg.root)
    test_set, spec = build_dataset(loaded.data_cfg, "test")
    model = loaded.model.to(dist.device())
    if args.eps is not None:
        eps_list = parse_eps(args.eps)
    elif loaded.cfg is not None:
        eps_list = [loaded.cfg.attack.eps]
    else:
        raise ConfigError("--eps is needed with --weights, e.g. --eps 0.1 or --eps 8/255")
    specs = build_specs(args, eps_list)
    plan = None
    all_specs = list(specs)
    if args.sanity:
        plan = sanity.sanity_specs(eps_list[0], in_chans=spec.in_chans, steps=args.steps, norm=args.norm,
                                   square_queries=args.square_queries)
        for extra_spec in plan.specs():
            if extra_spec.label not in {s.label for s in all_specs}:
                all_specs.append(extra_spec)
    n = len(test_set) if args.max_examples is None else min(args.max_examples, len(test_set))
    log.info("evaluating %s on %d %s test examples, %d rank(s): %s", loaded.source.get("run_dir") or
             loaded.source.get("weights"), n, loaded.data_cfg.name, dist.world_size(),
             ", ".join(s.label for s in all_specs))
    t0 = time.perf_counter()
    with ui.progress_bar(n * len(all_specs), "eval") as advance:
        result = evaluate(model, test_set, all_specs, batch_size=args.batch_size, seed=args.seed,
                          max_examples=args.max_examples, on_batch=lambda k: advance(k * len(all_specs) * dist.world_size()))
    seconds = time.perf_counter() - t0
    checks = None
    if plan is not None:
        summary = result.summary()
        curves: dict[str, list[tuple[float, float]]] = {}
        for s in specs:
            if len(eps_list) > 1:
                curves.setdefault(s.label.rsplit("@", 1)[0], []).append((s.eps, summary[s.label]["robust_acc"]))
        big_pgd = plan.big.label.rsplit("@", 1)[0]
        if big_pgd in curves:
            curves[big_pgd].append((plan.big_eps, summary[plan.big.label]["robust_acc"]))
        white = {s.label: summary[s.label]["robust_acc"] for s in all_specs
                 if s.eps == plan.eps and s.attack not in ("square", "fgsm", "fgsm_rs")}
        checks = sanity.run_checks(summary, plan, curves, white)
    report = build_report(result, all_specs, loaded.source, args, checks, seconds)
    if dist.is_main_process():
        out = Path(args.out) if args.out else (Path(loaded.source["run_dir"]) if args.run else Path("eval_out"))
        atomic_write_json(out / EVAL_JSON, report)
        plot_curves(report, out / PLOT, f"{loaded.source.get('model')} on {loaded.data_cfg.name}")
        ui.show(ui.table(f"robust accuracy on {result.count} test examples ({dist.world_size()} rank(s))",
                         ["attack", "eps", "clean acc", "robust acc", "count", "seconds"],
                         [(r["label"].rsplit("@", 1)[0], r["eps"], r["clean_acc"], r["robust_acc"], r["count"],
                           r["seconds"]) for r in report["results"]]))
        if checks is not None:
            for c in checks:
                (log.info if c.status == "pass" else log.warning)("sanity %s: %s: %s", c.status.upper(), c.check, c.detail)
        log.info("wrote %s and %s", out / EVAL_JSON, out / PLOT)
    dist.barrier()
    return report


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="dat-ds robust evaluation (one rank of it)")
    add_eval_args(p)
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the DeepSpeed launcher
    return p
