"""``dat-ds bench ablations``: what each state-of-the-art training option adds, one at a time, over seeds.

Issue 15's ablation: TRADES (beta 6, as in ``recipes/fashion_mnist_full_sota.yaml``) on the demo model and
data (small_cnn_avgpool, embedded Fashion-MNIST, eps 0.1, PGD-5 training attack, cosine LR), then the same
run with exactly one option added -- weight EMA, AWP, label smoothing, CutMix, consistency regularisation --
and with the SOTA recipe's combination (EMA + AWP + label smoothing). Every variant is trained with every
seed (``seed`` seeds the initialisation, the data order and the attack noise), so a variant and the baseline
with the same seed differ only by the option: the effect is the mean of the paired differences, with its
standard error and a 95 % t interval over the seeds.

Each final checkpoint is scored by ``dat-ds eval`` (its own ranks; the EMA weights where the run has an EMA,
as ``dat-ds eval``/``export`` default to) with APGD-CE and APGD-DLR (100 iterations each, Croce & Hein 2020)
on the first ``--eval-examples`` test images; an image counts as robust only if neither attack fooled it
(per-image worst case). APGD-DLR is in the pair because label smoothing can mask the cross-entropy gradient
(its loss is shift- and scale-invariant in the logits). This is AutoAttack's gradient half, not AutoAttack:
the JSON and the table name it so. The in-training PGD-20 is kept next to it.

A verdict per option: ``helped`` when the 95 % interval of the robust-accuracy difference lies above 0,
``hurt`` when below, else ``no clear effect`` (with 3 seeds the t factor is 4.30: only large effects count).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dat_ds.core import resources
from dat_ds.core.io import save_bar_plot
from dat_ds.launch.launcher import launch

from . import write_result
from .common import finished_run, runs_folder, selected_names, show_table

log = logging.getLogger(__name__)
BASE_RECIPE = resources.packaged(resources.RECIPES, "demo")
BASELINE = "trades"
ATTACKS = ("apgd-ce", "apgd-dlr")  # scored together: per-image worst case
EVAL_FOLDER = "eval-ablation"
# two-sided 95 % Student t quantiles by degrees of freedom (n seeds - 1); beyond the table the normal 1.96
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
       15: 2.131, 20: 2.086, 30: 2.042}


@dataclass(frozen=True)
class Variant:
    label: str
    overrides: tuple[str, ...]  # --set values on top of the baseline's


# The baseline's settings; every variant adds its own on top. The option settings are the SOTA recipe's.
COMMON = ("attack.name=pgd", "attack.steps=5", "objective.name=trades", "objective.beta=6.0")
EMA = "ema={decay: 0.995, warmup: true}"
AWP = "awp={gamma: 0.005, warmup_epochs: 1}"
LS = "objective.label_smoothing=0.1"
VARIANTS: dict[str, Variant] = {
    BASELINE: Variant("TRADES (beta 6), the baseline", ()),
    "ema": Variant("+ weight EMA (0.995, warm-up)", (EMA,)),
    "awp": Variant("+ AWP (gamma 5e-3, after 1 epoch)", (AWP,)),
    "label_smoothing": Variant("+ label smoothing 0.1", (LS,)),
    "cutmix": Variant("+ CutMix (alpha 1, soft labels)", ("objective.cutmix={}",)),
    "consistency": Variant("+ consistency (2 views, JS, T 0.5)", ("objective.consistency={}",)),
    "sota": Variant("+ EMA + AWP + label smoothing (the SOTA recipe)", (EMA, AWP, LS)),
}


# ----------------------------------------------------------------------------- statistics (pure functions)


def t95(dof: int) -> float:
    """The 95 % two-sided t quantile; between table entries the next smaller dof's (a wider, safe interval)."""
    if dof < 1:
        return math.inf
    if dof > max(T95):
        return 1.96
    return T95[max(d for d in T95 if d <= dof)]


def mean_se(values: list[float]) -> tuple[float, float | None]:
    """Mean and standard error of the mean (sample standard deviation / sqrt n; None for one value)."""
    m = statistics.fmean(values)
    return m, (statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None)


def paired_effect(variant: dict[int, float], baseline: dict[int, float]) -> dict[str, Any]:
    """Mean of variant - baseline over the seeds both have, its standard error, 95 % t interval and verdict."""
    seeds = sorted(set(variant) & set(baseline))
    diffs = [variant[s] - baseline[s] for s in seeds]
    if not diffs:
        return {"seeds": [], "diff": None, "se": None, "ci95": None, "verdict": "not measured"}
    diff, se = mean_se(diffs)
    if se is None:
        return {"seeds": seeds, "diff": diff, "se": None, "ci95": None, "verdict": "one seed: no interval"}
    half = t95(len(diffs) - 1) * se
    lo, hi = diff - half, diff + half
    verdict = "helped" if lo > 0 else "hurt" if hi < 0 else "no clear effect"
    return {"seeds": seeds, "diff": diff, "se": se, "ci95": [lo, hi], "verdict": verdict}


def worst_case(report: dict[str, Any], attacks: tuple[str, ...] = ATTACKS) -> dict[str, Any]:
    """Per-image worst case over ``attacks``' rows of one ``eval.json`` (each row's ``correct`` bit string)."""
    rows = {r["attack"]: r for r in report["results"]}
    missing = [a for a in attacks if a not in rows]
    if missing:
        raise RuntimeError(f"eval.json has no {missing[0]} row (rows: {', '.join(rows)})")
    from dat_ds.evaluation.run import correct_under_all

    try:
        robust = sum(correct_under_all([rows[a] for a in attacks], report["count"])) / report["count"]
    except ValueError as e:
        raise RuntimeError(str(e)) from None
    return {"clean_acc": report["clean_acc"], "robust_acc": robust, "count": report["count"],
            "per_attack": {rows[a]["label"]: rows[a]["robust_acc"] for a in attacks}}


def summarize(scores: dict[str, dict[int, dict[str, Any]]]) -> dict[str, Any]:
    """Per variant: mean +- SE of clean, robust and PGD-20 accuracy; the paired effect against the baseline."""
    base = {s: r["robust_acc"] for s, r in scores[BASELINE].items()}
    base_clean = {s: r["clean_acc"] for s, r in scores[BASELINE].items()}
    out = {}
    for name, per_seed in scores.items():
        seeds = sorted(per_seed)
        row: dict[str, Any] = {"label": VARIANTS[name].label, "overrides": list(VARIANTS[name].overrides),
                               "seeds": seeds}
        for key in ("clean_acc", "robust_acc", "pgd20_acc", "train_seconds"):
            vals = [per_seed[s][key] for s in seeds if per_seed[s].get(key) is not None]
            row[key], row[f"{key}_se"] = mean_se(vals) if vals else (None, None)
        if name != BASELINE:
            row["robust_effect"] = paired_effect({s: per_seed[s]["robust_acc"] for s in seeds}, base)
            row["clean_effect"] = paired_effect({s: per_seed[s]["clean_acc"] for s in seeds}, base_clean)
        out[name] = row
    return out


# ----------------------------------------------------------------------------- training and scoring


def run_name(variant: str, seed: int) -> str:
    return f"{variant}_seed{seed}"


def train_argv(variant: str, seed: int, args: argparse.Namespace, runs: Path) -> list[str]:
    """``dat-ds train`` arguments: the demo recipe, the baseline's settings, the variant's option, the seed."""
    sets = [f"seed={seed}", f"attack.eps={args.eps}", *COMMON, "eval.attack=pgd", "eval.steps=20",
            f"eval.every_epochs={args.epochs}", f"eval.max_examples={args.eval_examples}", "train.keep_last=1",
            "train.save_every_steps=0", *([f"data.train_subset={args.train_examples}"] if args.train_examples else []),
            *VARIANTS[variant].overrides]
    return ["--config", str(BASE_RECIPE), "--name", run_name(variant, seed), "--output-dir", str(runs),
            "--epochs", str(args.epochs), "--overwrite", *(a for s in sets for a in ("--set", s))]


def eval_argv(run_dir: Path, args: argparse.Namespace) -> list[str]:
    return ["--run", str(run_dir), "--attacks", ",".join(ATTACKS), "--apgd-steps", str(apgd_steps(args)),
            "--max-examples", str(args.eval_examples), "--batch-size", str(args.eval_batch_size),
            "--out", str(run_dir / EVAL_FOLDER)]


def apgd_steps(args: argparse.Namespace) -> int:
    """The APGD iterations this bench runs: ``--apgd-steps``, else the attacks' own default."""
    from dat_ds.attacks import attack_parameters

    return args.apgd_steps if args.apgd_steps is not None else attack_parameters(ATTACKS[0])["apgd_steps"]


def usable_eval(path: Path, args: argparse.Namespace) -> dict[str, Any] | None:
    """An earlier evaluation at ``path`` with this bench's attacks, iterations and images, else None."""
    if not path.is_file():
        return None
    report = json.loads(path.read_text())
    rows = {r["attack"]: r for r in report.get("results", [])}
    default = apgd_steps(argparse.Namespace(apgd_steps=None))
    # eval.json names a setting in a row's "extra" only where it is not the attack's default
    ok = report.get("count") == args.eval_examples and all(
        a in rows and rows[a].get("restarts", 1) == 1
        and rows[a].get("extra", {}).get("apgd_steps", default) == apgd_steps(args) for a in ATTACKS)
    return report if ok else None


def train_and_score(variant: str, seed: int, args: argparse.Namespace, runs: Path) -> dict[str, Any]:
    name = run_name(variant, seed)
    run_dir = runs / name
    argv = train_argv(variant, seed, args, runs)
    if args.reuse and finished_run(run_dir, argv, args.epochs):
        log.info("%s: reusing the finished run in %s (--reuse)", name, run_dir)
    else:
        launch("dat_ds.train", argv, nproc=args.nproc)
    report = usable_eval(run_dir / EVAL_FOLDER / "eval.json", args) if args.reuse else None
    if report is None:
        launch("dat_ds.evaluate", eval_argv(run_dir, args), nproc=args.nproc)
        report = json.loads((run_dir / EVAL_FOLDER / "eval.json").read_text())
    history = json.loads((run_dir / "summary.json").read_text())["history"]
    weights = report["source"]["which_weights"]  # the in-training PGD-20 of the same weights dat-ds eval scored
    return {**worst_case(report), "weights": weights,
            "pgd20_acc": history[-1]["ema_robust_acc" if weights == "ema" else "robust_acc"],
            "pgd20_label": history[-1].get("robust_attack"),
            "train_seconds": sum(h["train_seconds"] for h in history), "eval_seconds": report["seconds"]}


# ----------------------------------------------------------------------------- the benchmark


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--epochs", type=int, default=6, help="passes over the training data (demo: 6)")
    p.add_argument("--seeds", default="0,1,2", help="comma list of seeds; every variant is trained with each")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma list from {', '.join(VARIANTS)}; {BASELINE} (the baseline) is always included")
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--eval-examples", type=int, default=1000, help="first N test images, for PGD-20 and APGD")
    p.add_argument("--eval-batch-size", type=int, default=500)
    p.add_argument("--apgd-steps", type=int, default=None,
                   help="APGD-CE / APGD-DLR iterations (default: the attacks' own, 100 as in AutoAttack)")
    p.add_argument("--train-examples", type=int, default=None,
                   help="train on the first N training images (data.train_subset; default: all 10,000)")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--runs-dir", default=None, help="keep the run folders here (default: a temporary folder)")
    p.add_argument("--reuse", action="store_true",
                   help="with --runs-dir: reuse finished runs of the same config and their evaluations")


def selected(text: str, known: dict[str, Any], what: str) -> list[str]:
    return selected_names(text, known, BASELINE, what=what, flag="--variants")


def parse_seeds(text: str) -> list[int]:
    from dat_ds.core.errors import ConfigError

    try:
        seeds = list(dict.fromkeys(int(s) for s in text.split(",") if s.strip()))
    except ValueError:
        raise ConfigError(f"--seeds={text!r} must be a comma list of integers, e.g. --seeds 0,1,2") from None
    if not seeds:
        raise ConfigError("--seeds names no seed; e.g. --seeds 0,1,2")
    return seeds


def run(args: argparse.Namespace) -> dict[str, Any]:
    variants, seeds = selected(args.variants, VARIANTS, "variant"), parse_seeds(args.seeds)
    with runs_folder(args.runs_dir, args.reuse, "dat-ds-ablations-") as runs:
        # seed by seed, so an interrupted bench has whole seeds for every variant
        scores: dict[str, dict[int, dict[str, Any]]] = {v: {} for v in variants}
        for seed in seeds:
            for v in variants:
                scores[v][seed] = train_and_score(v, seed, args, runs)
    summary = summarize(scores)
    attack = (f"per-image worst case of APGD-CE and APGD-DLR ({apgd_steps(args)} iterations each; AutoAttack's "
              "gradient attacks, not AutoAttack)")
    out = {"eps": args.eps, "epochs": args.epochs, "nproc": args.nproc, "seeds": seeds,
           "eval_examples": args.eval_examples, "train_examples": args.train_examples or "all",
           "setup": "demo model and data (small_cnn_avgpool, embedded Fashion-MNIST), TRADES beta 6, PGD-5 training "
                    "attack, cosine LR; each variant adds one option; same seeds for every variant (paired)",
           "robust_attack": attack, "summary": summary,
           "scores": {v: {str(s): r for s, r in per.items()} for v, per in scores.items()}}
    write_result(args.out, "ablations", out)
    save_bar_plot(Path(args.out) / "ablations.png", list(summary), [r["robust_acc"] for r in summary.values()],
                  ylabel="robust accuracy (APGD-CE + APGD-DLR)", title=f"ablations, mean of {len(seeds)} seed(s)",
                  hline=summary[BASELINE]["robust_acc"], hline_label="baseline (TRADES)")

    def pm(m, se):
        return None if m is None else f"{m:.4f}" + ("" if se is None else f" ± {se:.4f}")

    show_table(f"bench ablations: {attack} on {args.eval_examples} test images, seeds {seeds}",
               ["variant", "clean", "robust", "PGD-20", "robust vs baseline", "95 % interval", "verdict", "train s"],
               [[v, pm(r["clean_acc"], r["clean_acc_se"]), pm(r["robust_acc"], r["robust_acc_se"]),
                 pm(r["pgd20_acc"], r["pgd20_acc_se"]),
                 pm(r["robust_effect"]["diff"], r["robust_effect"]["se"]) if v != BASELINE else "",
                 ("" if v == BASELINE or r["robust_effect"]["ci95"] is None else
                  "[{:+.4f}, {:+.4f}]".format(*r["robust_effect"]["ci95"])),
                 r["robust_effect"]["verdict"] if v != BASELINE else "", r["train_seconds"]]
                for v, r in summary.items()])
    return out
