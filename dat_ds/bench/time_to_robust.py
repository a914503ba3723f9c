"""``dat-ds bench time-to-robust``: wall time for fast AT (FGSM-RS, Free-AT) and PGD-7 AT to become robust.

Each method trains the demo model on the embedded data with the real trainer, evaluating PGD-20
accuracy on a fixed slice of the test set after every epoch. The x-axis is cumulative training time
(evaluation excluded). Goal (issue 8): fast AT reaches >= 95% of PGD-AT's final robust accuracy in
<= 40% of PGD-AT's time.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from ..launch.launcher import launch
from . import write_result
from .common import show_table

log = logging.getLogger(__name__)
DEMO_RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "demo.yaml"

METHODS = {
    # Every method gets the same number of passes over the data; Free-AT replays each batch m=4 times
    # per pass, which is its whole budget (Shafahi et al. divide the epoch count by m instead): m times
    # the optimizer steps of the others, which the results report next to the wall time.
    "fgsm_rs": ["attack.name=fgsm_rs", "objective.name=madry"],
    "free": ["attack.name=none", "objective.name=free", "objective.replays=4"],
    "pgd7": ["attack.name=pgd", "attack.steps=7", "objective.name=madry"],
}


def train_method(name: str, overrides: list[str], epochs: int, *, eps: float, eval_examples: int, nproc: int,
                 out_dir: Path) -> list[dict[str, Any]]:
    sets = [*overrides, f"attack.eps={eps}", "eval.every_epochs=1", f"eval.max_examples={eval_examples}",
            "optim.schedule=constant", "optim.warmup_epochs=0", "train.keep_last=1"]
    argv = ["--config", str(DEMO_RECIPE), "--name", name, "--output-dir", str(out_dir), "--epochs", str(epochs),
            "--overwrite", *(a for s in sets for a in ("--set", s))]
    launch("dat_ds.launch.train", argv, nproc=nproc)  # the `dat-ds train` ranks; raises RankFailure on failure
    history = json.loads((out_dir / name / "summary.json").read_text())["history"]
    t, curve = 0.0, []
    for h in history:
        t += h["train_seconds"]
        # optimizer_steps: the engine's count, cumulative, replays included (what the LR schedule counts)
        curve.append({"epoch": h["epoch"], "train_seconds": t, "optimizer_steps": h["optimizer_steps"],
                      "clean_acc": h["clean_acc"], "robust_acc": h["robust_acc"]})
    return curve


def optimizer_steps_to(curve: list[dict[str, Any]], target: float) -> int | None:
    return next((c["optimizer_steps"] for c in curve if c["robust_acc"] >= target), None)


def first_time_reaching(curve: list[dict[str, Any]], target: float) -> float | None:
    return next((c["train_seconds"] for c in curve if c["robust_acc"] >= target), None)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--epochs", type=int, default=4, help="passes over the training data for every method")
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--eval-examples", type=int, default=1000)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--methods", default=",".join(METHODS))


def run(args: argparse.Namespace) -> dict[str, Any]:
    from ..objectives import OBJECTIVES

    curves: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.methods.split(","):
            if name == "free" and "free" not in OBJECTIVES:
                log.warning("Free-AT objective not registered; skipping it")
                continue
            curves[name] = train_method(name, METHODS[name], args.epochs, eps=args.eps, eval_examples=args.eval_examples,
                                        nproc=args.nproc, out_dir=Path(tmp))
    pgd = curves["pgd7"]
    pgd_final, pgd_time = pgd[-1]["robust_acc"], pgd[-1]["train_seconds"]
    target = 0.95 * pgd_final
    summary = {}
    for name, curve in curves.items():
        t = first_time_reaching(curve, target)
        summary[name] = {"final_robust_acc": curve[-1]["robust_acc"], "final_clean_acc": curve[-1]["clean_acc"],
                         "train_seconds": curve[-1]["train_seconds"], "seconds_to_target": t,
                         "optimizer_steps": curve[-1]["optimizer_steps"],
                         "optimizer_steps_to_target": optimizer_steps_to(curve, target),
                         "fraction_of_pgd_time": None if t is None else t / pgd_time}
    fast = [summary[m]["fraction_of_pgd_time"] for m in ("fgsm_rs", "free") if m in summary]
    out = {"eps": args.eps, "target_robust_acc": target, "pgd7_final_robust_acc": pgd_final, "curves": curves,
           "summary": summary, "goal": "a fast method reaches 95% of PGD-7's final robust acc in <= 40% of its time",
           "goal_met": any(f is not None and f <= 0.4 for f in fast)}
    write_result(args.out, "time_to_robust", out)
    _plot(curves, target, Path(args.out) / "time_to_robust.png")
    show_table(f"bench time-to-robust: target = 95% of PGD-7's final PGD-20 acc ({target:.3f})",
               ["method", "final PGD-20 acc", "clean acc", "train s", "optimizer steps", "s to target",
                "steps to target", "fraction of PGD-7 time"],
               [[m, s["final_robust_acc"], s["final_clean_acc"], s["train_seconds"], s["optimizer_steps"],
                 s["seconds_to_target"], s["optimizer_steps_to_target"], s["fraction_of_pgd_time"]]
                for m, s in summary.items()])
    return out


def _plot(curves, target: float, path: Path) -> None:
    import matplotlib

    from ..core.io import save_figure

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, curve in curves.items():
        ax.plot([0] + [c["train_seconds"] for c in curve], [0] + [c["robust_acc"] for c in curve], marker="o", label=name)
    ax.axhline(target, color="gray", ls="--", label="95% of PGD-7 final")
    ax.set(xlabel="training wall time (s)", ylabel="PGD-20 accuracy", title="time to robustness (embedded data)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)
