"""``dat-ds bench time-to-robust``: how soon each fast AT method is as robust as PGD-10 AT, judged by AutoAttack.

Every method trains the same model on the same data (the demo recipe: small_cnn_avgpool on the embedded
Fashion-MNIST, eps 0.1), on ``--nproc`` ranks, with the real trainer (``dat-ds train`` through the one
launcher), for the same number of passes over the data, with the catastrophic-overfitting monitor on
(``monitor.policy=warn``) and one checkpoint kept per epoch.

Per epoch the trainer measures PGD-20 on the first ``--eval-examples`` test images: the curve. The
judgement is by AutoAttack (standard: APGD-CE, APGD-T, FAB-T, Square 5,000 queries, Croce & Hein's
settings), through ``dat-ds eval``'s own ranks (``dat_ds.evaluate`` -> ``evaluation.loading.load_run``
-> ``evaluation.evaluate``) on the same images, with PGD-50 x 5 restarts and the gradient-masking checks
(``--sanity``) in the same evaluation:

1. the reference (PGD-10 AT) is scored after its last epoch; target = its AutoAttack accuracy - 1 pp;
2. every other method is scored after its last epoch, and at each earlier epoch whose PGD-20 accuracy
   reaches the target, in order, until one passes. An epoch whose PGD-20 accuracy is below the target is
   not scored: AutoAttack, which broke every example PGD-20 broke and more on the demo model
   (docs/evaluation.md), can only be lower there. Skipping epochs can only make a method look slower, never faster; every scored
   checkpoint's AutoAttack <= PGD-20 is checked and reported (``aa_above_pgd20``);
3. a method's time to the target is its cumulative training time (evaluation and the monitor's own
   measurements excluded) at the first epoch whose AutoAttack accuracy reaches the target; its ratio is
   that time over the reference's training time. Only AutoAttack-scored epochs count.

Goal (issue 18): some method reaches the target in <= 0.5x the reference's time, with its PGD-50 x 5
accuracy at that checkpoint also >= the target and every sanity check passing there.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dat_ds.core import resources
from dat_ds.launch.launcher import launch

from . import write_result
from .common import finished_run, runs_folder, selected_names, show_table

log = logging.getLogger(__name__)
BASE_RECIPE = resources.packaged(resources.RECIPES, "demo")  # the DAT-PGD-5 demo; each method overrides it
REFERENCE = "pgd10"
MARGIN = 0.01  # the target is the reference's final AutoAttack accuracy minus 1 pp
GOAL_RATIO = 0.5
PGD_STEPS, PGD_RESTARTS = 50, 5  # the second final attack, next to AutoAttack
# --quick-eval (tests only): a few AutoAttack iterations and queries, so a smoke run takes seconds, not
# minutes per batch. It is NOT standard AutoAttack: the labels say so and the goal is never met with it.
QUICK_EVAL = ("--aa-steps", "2", "--aa-queries", "20", "--square-queries", "20")
ARCHIVE = "time_to_robust_evals"  # under --out: <method>/eval-<tag>.json, each scored eval.json + its weights' hash


@dataclass(frozen=True)
class Method:
    label: str
    overrides: tuple[str, ...]  # --set values on top of the demo recipe and the bench's common settings


# Every method: Madry's objective (CE on adversarial examples only; Free-AT its own), the recipe's
# cosine LR with its half-epoch warm-up unless the method names its own schedule, the same passes over
# the data. Free-AT replays each batch m = 4 times per pass, which is its whole budget (Shafahi et al.
# divide the epoch count by m instead): m times the optimizer steps of the others, reported as such.
METHODS: dict[str, Method] = {
    "pgd10": Method("PGD-10 AT (reference)", ("attack.name=pgd", "attack.steps=10", "objective.name=madry")),
    "pgd5": Method("PGD-5 AT", ("attack.name=pgd", "attack.steps=5", "objective.name=madry")),
    "fgsm_rs": Method("FGSM-RS (Wong et al. 2020)", ("attack.name=fgsm_rs", "objective.name=madry")),
    "nfgsm": Method("N-FGSM (de Jorge et al. 2022)", ("attack.name=nfgsm", "objective.name=madry")),
    "free": Method("Free-AT, m = 4 (Shafahi et al. 2019)",
                   ("attack.name=none", "objective.name=free", "objective.replays=4")),
    "atta_pgd2": Method("ATTA-PGD-2 (Zheng et al. 2020)",
                        ("attack.name=pgd", "attack.steps=2", "attack.reuse=true", "objective.name=madry")),
    # The best combination we expect: N-FGSM's single step without catastrophic overfitting, with the
    # one-cycle LR fast AT was published with (large LR for most of a short run, converged at the end).
    "nfgsm_onecycle": Method("N-FGSM + one-cycle LR",
                             ("attack.name=nfgsm", "objective.name=madry", "optim.schedule=onecycle",
                              "optim.warmup_epochs=0")),
}


# ----------------------------------------------------------------------------- judging (pure functions)


def next_epoch_to_score(curve: list[dict[str, Any]], scored: dict[int, float], target: float) -> int | None:
    """The next epoch to score with AutoAttack, or None when the answer is known.

    Epochs in order: one already scored at or above the target ends the search; an unscored one is next
    when its PGD-20 accuracy minus the method's smallest PGD-20 - AutoAttack gap on its scored epochs (at
    least 0: AutoAttack broke every example PGD-20 broke on the demo model) reaches the target. The other
    epochs are predicted to fail under AutoAttack and are not scored: a skipped epoch can only make a
    method look slower, never faster, and standard AutoAttack costs ~20 min per checkpoint on 2 CPU cores.
    """
    pgd20 = {p["epoch"]: p["robust_acc"] for p in curve}
    gaps = [pgd20[e] - aa for e, aa in scored.items() if pgd20.get(e) is not None]
    gap = max(0.0, min(gaps, default=0.0))
    for point in curve:
        epoch = point["epoch"]
        if epoch in scored:
            if scored[epoch] >= target:
                return None
            continue
        if point["robust_acc"] is not None and point["robust_acc"] - gap >= target:
            return epoch
    return None


def judge(curves: dict[str, list[dict[str, Any]]], autoattack: dict[str, dict[int, float]], *,
          reference: str = REFERENCE, margin: float = MARGIN) -> dict[str, Any]:
    """Target and each method's time to it, from the per-epoch curves and the AutoAttack scores.

    ``curves[m]``: epochs in order, each with ``epoch`` and cumulative ``train_seconds``;
    ``autoattack[m]``: epoch -> AutoAttack accuracy of that epoch's checkpoint (only scored epochs).
    The reference must be scored at its last epoch.
    """
    ref_curve = curves[reference]
    ref_final = autoattack[reference][ref_curve[-1]["epoch"]]
    target = ref_final - margin
    ref_seconds = ref_curve[-1]["train_seconds"]
    methods = {}
    for name, curve in curves.items():
        hit = next((p for p in curve if autoattack.get(name, {}).get(p["epoch"], -1.0) >= target), None)
        methods[name] = {
            "epoch_to_target": None if hit is None else hit["epoch"],
            "seconds_to_target": None if hit is None else hit["train_seconds"],
            "ratio_to_reference": None if hit is None else hit["train_seconds"] / ref_seconds,
            "scored_epochs": sorted(autoattack.get(name, {})),
        }
    return {"reference": reference, "reference_final_autoattack": ref_final, "target_autoattack": target,
            "reference_train_seconds": ref_seconds, "methods": methods}


# ----------------------------------------------------------------------------- training and scoring


def train_argv(name: str, method: Method, args: argparse.Namespace, runs: Path) -> list[str]:
    """``dat-ds train`` arguments for one method: the demo recipe, the bench's common settings, the method's."""
    sets = [f"attack.eps={args.eps}", "eval.attack=pgd", "eval.steps=20",
            "eval.every_epochs=1", f"eval.max_examples={args.eval_examples}", f"train.keep_last={args.epochs}",
            "train.save_every_steps=0", f"monitor.every_steps={args.monitor_every}", "monitor.policy=warn",
            *([f"data.train_subset={args.train_examples}"] if args.train_examples else []), *method.overrides]
    return ["--config", str(BASE_RECIPE), "--name", name, "--output-dir", str(runs), "--epochs", str(args.epochs),
            "--overwrite", *(a for s in sets for a in ("--set", s))]


def train_method(name: str, method: Method, args: argparse.Namespace, runs: Path) -> list[dict[str, Any]]:
    """Train one method with ``dat-ds train``'s ranks; its per-epoch curve (monitor time taken out)."""
    argv = train_argv(name, method, args, runs)
    if args.reuse and finished_run(runs / name, argv, args.epochs):
        log.info("%s: reusing the finished run in %s (--reuse; its training times are that run's)", name, runs / name)
    else:
        launch("dat_ds.train", argv, nproc=args.nproc)  # RankFailure on failure
    return read_curve(runs / name)


def read_curve(run_dir: Path) -> list[dict[str, Any]]:
    from dat_ds.core.io import read_jsonl

    history = json.loads((run_dir / "summary.json").read_text())["history"]
    monitor = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r.get("kind") == "monitor"]
    t, curve = 0.0, []
    for h in history:
        # the monitor runs inside the loop's timer (its records' epoch is 0-based, the history's 1-based)
        mine = [r for r in monitor if r["epoch"] + 1 == h["epoch"]]
        monitor_seconds = sum(r.get("seconds", 0.0) for r in mine)
        t += h["train_seconds"] - monitor_seconds
        # optimizer_steps: the engine's count, cumulative, replays included (what the LR schedule counts)
        curve.append({"epoch": h["epoch"], "train_seconds": t, "monitor_seconds": monitor_seconds,
                      "optimizer_steps": h["optimizer_steps"], "clean_acc": h["clean_acc"],
                      "robust_acc": h["robust_acc"], "robust_attack": h.get("robust_attack"),
                      "monitor_min_pgd_acc": min((r["pgd_acc"] for r in mine), default=None),
                      "monitor_max_gap": max((r["gap"] for r in mine), default=None),
                      "monitor_overfit": any(r["overfit"] for r in mine)})
    return curve


def weights_sha256(run_dir: Path, tag: str) -> str:
    """SHA-256 of the weights ``dat-ds eval`` scores at ``tag`` (names, dtypes, shapes and bytes, in name order)."""
    import hashlib

    import torch

    from dat_ds.evaluation.loading import load_run

    state = load_run(run_dir, tag).model.state_dict()
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def archive_path(args: argparse.Namespace, method: str, tag: str) -> Path:
    return Path(args.out) / ARCHIVE / method / f"eval-{tag}.json"


def score_checkpoint(run_dir: Path, epoch: int, args: argparse.Namespace) -> dict[str, Any]:
    """AutoAttack (standard) + PGD-50 x 5 + the sanity checks on one epoch's checkpoint, by ``dat-ds eval``.

    Every scored ``eval.json`` is also kept under ``--out`` (``ARCHIVE``), with the SHA-256 of the weights it
    scored. With ``--reuse`` an evaluation is taken from the run folder, else from that archive when the
    checkpoint's weights hash the same (the training is deterministic: a retrained run on another machine
    gets its earlier evaluations back only if its weights are bit-identical)."""
    from dat_ds.core.io import atomic_write_json
    from dat_ds.runtime.checkpoint import tag_for

    tag = tag_for(epoch - 1, 0, end_of_epoch=True)
    out = run_dir / f"eval-{tag}"
    archived = archive_path(args, run_dir.name, tag)
    sha = weights_sha256(run_dir, tag)
    report = None
    if args.reuse:
        if (report := reusable_eval(out / "eval.json", args)) is not None:
            log.info("%s epoch %d: reusing %s (--reuse)", run_dir.name, epoch, out / "eval.json")
        elif (report := archived_eval(archived, sha, args)) is not None:
            log.info("%s epoch %d: reusing %s (--reuse; the same weights, SHA-256 %s...)", run_dir.name, epoch,
                     archived, sha[:12])
    if report is None:
        # Without --quick-eval no --aa-steps/--aa-queries: AutoAttack runs with its reference settings
        # (100 iterations, 5,000 queries), and summarize_report checks that eval.json says so.
        argv = ["--run", str(run_dir), "--tag", tag, "--attacks", "autoattack,pgd", "--steps", str(PGD_STEPS),
                "--restarts", str(PGD_RESTARTS), "--sanity", "--max-examples", str(args.eval_examples),
                "--batch-size", str(args.eval_batch_size), "--out", str(out),
                *(QUICK_EVAL if args.quick_eval else ())]
        launch("dat_ds.evaluate", argv, nproc=args.nproc)
        report = json.loads((out / "eval.json").read_text())
    summary = summarize_report(report, epoch, tag, standard=not args.quick_eval)
    atomic_write_json(archived, {"method": run_dir.name, "tag": tag, "weights_sha256": sha, "eval": report})
    return summary


def _usable(report: dict[str, Any], args: argparse.Namespace) -> bool:
    """An earlier evaluation with this bench's attacks on the same images."""
    if report.get("count") != args.eval_examples or not report.get("sanity"):
        return False
    try:
        summarize_report(report, 0, "", standard=not args.quick_eval)
    except (RuntimeError, StopIteration, KeyError):  # another AutoAttack, no PGD-50 x 5 row: not this bench's
        return False
    return True


def reusable_eval(path: Path, args: argparse.Namespace) -> dict[str, Any] | None:
    """The earlier ``eval.json`` at ``path`` when it is usable (``_usable``), else None."""
    if not path.is_file():
        return None
    report = json.loads(path.read_text())
    return report if _usable(report, args) else None


def archived_eval(path: Path, sha: str, args: argparse.Namespace) -> dict[str, Any] | None:
    """The archived evaluation at ``path`` when it scored weights hashing to ``sha`` and is usable."""
    if not path.is_file():
        return None
    kept = json.loads(path.read_text())
    if kept.get("weights_sha256") != sha:
        log.warning("%s scored other weights (SHA-256 %s..., this checkpoint %s...): evaluating again", path,
                    str(kept.get("weights_sha256"))[:12], sha[:12])
        return None
    return kept["eval"] if _usable(kept["eval"], args) else None


def summarize_report(report: dict[str, Any], epoch: int, tag: str, *, standard: bool = True) -> dict[str, Any]:
    """The numbers the judgement needs from one ``eval.json``; refuses a weakened AutoAttack when ``standard``."""
    rows = report["results"]
    aa = [r for r in rows if r["attack"] == "autoattack"]
    if len(aa) != 1 or (standard and aa[0]["extra"]):
        raise RuntimeError(f"expected one standard AutoAttack row in eval.json, got {[r['label'] for r in aa]}")
    eps = aa[0]["eps"]
    pgd = next(r for r in rows if r["attack"] == "pgd" and r["steps"] == PGD_STEPS and r["restarts"] == PGD_RESTARTS
               and r["eps"] == eps)
    checks = report["sanity"] or []
    return {"epoch": epoch, "tag": tag, "count": report["count"], "clean_acc": report["clean_acc"],
            "autoattack_acc": aa[0]["robust_acc"], "autoattack_label": aa[0]["label"],
            "autoattack_seconds": aa[0]["seconds"], "pgd50x5_acc": pgd["robust_acc"], "pgd50x5_label": pgd["label"],
            "sanity_pass": bool(checks) and all(c["status"] == "pass" for c in checks),
            "sanity": checks, "eval_seconds": report["seconds"]}


def score_method(name: str, curve: list[dict[str, Any]], target: float | None, run_dir: Path,
                 args: argparse.Namespace) -> dict[int, dict[str, Any]]:
    """Score the last epoch, then (with a target) the earlier epochs ``next_epoch_to_score`` asks for."""
    scores = {curve[-1]["epoch"]: score_checkpoint(run_dir, curve[-1]["epoch"], args)}
    while target is not None:
        epoch = next_epoch_to_score(curve, {e: s["autoattack_acc"] for e, s in scores.items()}, target)
        if epoch is None:
            break
        log.info("%s: epoch %d has PGD-20 >= target %.4f; scoring it with AutoAttack", name, epoch, target)
        scores[epoch] = score_checkpoint(run_dir, epoch, args)
    return dict(sorted(scores.items()))


# ----------------------------------------------------------------------------- the benchmark


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--epochs", type=int, default=6, help="passes over the training data for every method (demo: 6)")
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--eval-examples", type=int, default=1000,
                   help="first N test images for the per-epoch PGD-20 curve and the AutoAttack judgement")
    p.add_argument("--eval-batch-size", type=int, default=500,
                   help="dat-ds eval's batch: AutoAttack's cost grows with the number of batches more than with "
                        "their size on a CPU (Square's 5,000 queries run one after another), so 1,000 images on 2 "
                        "ranks are one batch per rank")
    p.add_argument("--train-examples", type=int, default=None,
                   help="train on the first N training images (data.train_subset; default: all 10,000)")
    p.add_argument("--monitor-every", type=int, default=40, help="catastrophic-overfitting check every N steps")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list from {', '.join(METHODS)}; "
                   f"{REFERENCE} (the reference) is always included")
    p.add_argument("--runs-dir", default=None, help="keep the run folders here (default: a temporary folder)")
    p.add_argument("--reuse", action="store_true",
                   help="with --runs-dir: reuse the finished runs (same config, all epochs) and evaluations (same "
                        "attacks, same images) found there, e.g. to finish an interrupted benchmark; reused training "
                        "times are those of the earlier run")
    p.add_argument("--quick-eval", action="store_true",
                   help="smoke tests only: AutoAttack with 2 iterations / 20 queries (not standard; goal never met)")


def selected_methods(text: str) -> list[str]:
    return selected_names(text, METHODS, REFERENCE, what="method", flag="--methods")


def run(args: argparse.Namespace) -> dict[str, Any]:
    names = selected_methods(args.methods)
    with runs_folder(args.runs_dir, args.reuse, "dat-ds-ttr-") as runs:
        curves = {name: train_method(name, METHODS[name], args, runs) for name in names}
        scores = {REFERENCE: score_method(REFERENCE, curves[REFERENCE], None, runs / REFERENCE, args)}
        target = scores[REFERENCE][curves[REFERENCE][-1]["epoch"]]["autoattack_acc"] - MARGIN
        for name in names[1:]:
            scores[name] = score_method(name, curves[name], target, runs / name, args)
    out = build_result(curves, scores, args)
    write_result(args.out, "time_to_robust", out)
    plot(curves, scores, out["judgement"]["target_autoattack"], Path(args.out) / "time_to_robust.png")
    j = out["judgement"]
    show_table(f"bench time-to-robust: target = PGD-10 AT's final AutoAttack {j['reference_final_autoattack']:.4f}"
               f" - 1 pp = {j['target_autoattack']:.4f} ({args.eval_examples} test images, {args.nproc} rank(s))",
               ["method", "train s", "final AA", "final PGD-50x5", "final clean", "s to target", "ratio",
                "sanity", "CO flagged"],
               [[m, s["train_seconds"], s["final_autoattack"], s["final_pgd50x5"], s["final_clean_acc"],
                 s["seconds_to_target"], s["ratio_to_reference"], s["sanity_at_target"], s["monitor_overfit"]]
                for m, s in out["summary"].items()])
    return out


def build_result(curves: dict[str, list[dict[str, Any]]], scores: dict[str, dict[int, dict[str, Any]]],
                 args: argparse.Namespace) -> dict[str, Any]:
    autoattack = {m: {e: s["autoattack_acc"] for e, s in per.items()} for m, per in scores.items()}
    j = judge(curves, autoattack)
    target = j["target_autoattack"]
    summary = {}
    for name, curve in curves.items():
        final = scores[name][curve[-1]["epoch"]]
        hit = j["methods"][name]
        at = scores[name].get(hit["epoch_to_target"]) if hit["epoch_to_target"] is not None else None
        pgd20 = {p["epoch"]: p["robust_acc"] for p in curve}
        summary[name] = {
            "label": METHODS[name].label, "overrides": list(METHODS[name].overrides),
            "train_seconds": curve[-1]["train_seconds"], "optimizer_steps": curve[-1]["optimizer_steps"],
            "final_clean_acc": final["clean_acc"], "final_pgd20": curve[-1]["robust_acc"],
            "final_autoattack": final["autoattack_acc"], "final_pgd50x5": final["pgd50x5_acc"],
            **hit,
            "pgd50x5_at_target": None if at is None else at["pgd50x5_acc"],
            "sanity_at_target": None if at is None else at["sanity_pass"],
            "sanity_final": final["sanity_pass"],
            "monitor_overfit": any(p["monitor_overfit"] for p in curve),
            "aa_above_pgd20": [e for e, s in scores[name].items()
                               if pgd20.get(e) is not None and s["autoattack_acc"] > pgd20[e]],
        }
    winners = [m for m, s in summary.items() if m != REFERENCE and s["ratio_to_reference"] is not None
               and s["ratio_to_reference"] <= GOAL_RATIO and s["sanity_at_target"]
               and s["pgd50x5_at_target"] is not None and s["pgd50x5_at_target"] >= target]
    winner = min(winners, key=lambda m: summary[m]["ratio_to_reference"], default=None)
    standard = not args.quick_eval
    attack = ("AutoAttack standard (APGD-CE, APGD-T, FAB-T, Square 5000 queries; reference settings)" if standard else
              "NOT STANDARD AutoAttack (--quick-eval: 2 iterations, 20 queries; a smoke test, not a measurement)")
    return {
        "eps": args.eps, "epochs": args.epochs, "nproc": args.nproc, "eval_examples": args.eval_examples,
        "eval_batch_size": args.eval_batch_size,
        "train_examples": args.train_examples or "all",
        "setup": "demo recipe (small_cnn_avgpool, embedded Fashion-MNIST), Madry objective, same epochs for every "
                 "method; train_seconds: training only (per-epoch evaluation and the overfitting monitor's "
                 "measurements excluded)",
        "judge": f"{attack} on the first {args.eval_examples} test images of an epoch's checkpoint, via dat-ds "
                 "eval; target = reference's final AutoAttack - 1 pp; scored: every method's last epoch, and each "
                 "earlier epoch whose PGD-20 reaches the target (in order, until one passes); time to target = training seconds at the first "
                 "AutoAttack-scored epoch at or above it; PGD-50 x 5 restarts and the gradient-masking checks in the "
                 "same evaluation",
        "judgement": j, "summary": summary, "curves": curves,
        "scores": {m: {str(e): s for e, s in per.items()} for m, per in scores.items()},
        "goal": f"a method reaches the target in <= {GOAL_RATIO}x {REFERENCE}'s training time, with PGD-50 x 5 >= "
                "the target and every sanity check passing at that checkpoint",
        "autoattack_standard": standard, "winner": winner, "goal_met": standard and winner is not None,
    }


def plot(curves: dict[str, list[dict[str, Any]]], scores: dict[str, dict[int, dict[str, Any]]], target: float,
         path: Path) -> None:
    import matplotlib

    from dat_ds.core.io import save_figure

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, curve in curves.items():
        (line,) = ax.plot([0] + [c["train_seconds"] for c in curve], [0] + [c["robust_acc"] for c in curve],
                          marker=".", label=f"{name} (PGD-20)")
        seconds = {c["epoch"]: c["train_seconds"] for c in curve}
        pts = [(seconds[e], s["autoattack_acc"]) for e, s in scores[name].items()]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker="*", s=90, color=line.get_color(),
                   edgecolors="black", linewidths=0.5, zorder=3)
    ax.axhline(target, color="gray", ls="--", label="target: PGD-10 final AutoAttack - 1 pp")
    ax.scatter([], [], marker="*", s=90, color="white", edgecolors="black", label="AutoAttack (scored checkpoints)")
    ax.set(xlabel="training wall time (s)", ylabel="robust accuracy", title="time to robustness (embedded data)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)
