"""``dat-ds eval``: robust accuracy of a checkpoint under a list of attacks and eps values, on N ranks.

Module entry for every rank (``dat-ds eval --nproc 2`` starts it through the DeepSpeed launcher, or run
``deepspeed --num_gpus 2 --module dat_ds.evaluate --run runs/demo`` yourself). The test set is
sharded over ranks batch by batch, each batch's attack noise is seeded by its index, and per-example
results are gathered, so ``eval.json`` is the same for any number of ranks. Rank 0 writes the outputs.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import replace as replace_request
from pathlib import Path
from typing import Any

import torch

from ..attacks import ATTACKS, STANDARD_STAGES, AttackSpec, attack_parameters, takes
from ..core import dist, ui
from ..core.config import EvalConfig, default_of, parse_eps, replace
from ..core.errors import ConfigError
from ..core.io import atomic_write_json, read_indices, save_bar_plot, save_figure
from ..core.provenance import provenance
from ..core.requests import EvalRequest
from ..data import build_dataset
from . import sanity
from .evaluate import EvalResult, evaluate
from .loading import LoadedModel, load_classifier, load_weights
from .pictures import ADV_EXAMPLES, adversarial_grid

log = logging.getLogger(__name__)
EVAL_JSON = "eval.json"
PLOT = "robust_acc_vs_eps.png"


# ``dat-ds eval`` flag -> (the AttackSpec field or attack keyword it sets, the attacks it is for; None: every
# attack that takes it). A flag left at its neutral value sets nothing, so the attack's own default applies.
_FLAGS: dict[str, tuple[str, tuple[str, ...] | None]] = {
    "steps": ("steps", None), "restarts": ("restarts", None), "loss": ("loss", None),
    "aa_steps": ("aa_steps", ("autoattack",)), "aa_queries": ("n_queries", ("autoattack",)),
    "apgd_steps": ("apgd_steps", ("apgd-ce", "apgd-dlr")), "square_queries": ("n_queries", ("square",)),
}
_SPEC_FIELDS = ("steps", "restarts", "loss")
_SANITY_FLAGS = ("steps", "square_queries")  # what the --sanity plan takes from the command line


# How long the gather of the ranks' results waits for the slowest rank (every collective of dat-ds eval).
EVAL_TIMEOUT_S = 6 * 3600.0


def _neutral(dest: str) -> Any:
    """The value of a flag that sets nothing: eval's PGD steps, no restarts, CE, or the attack's own default."""
    if dest == "steps":
        return default_of(EvalConfig, "steps")
    if dest in ("restarts", "loss"):
        return 1 if dest == "restarts" else "ce"
    param, (attack, *_) = _FLAGS[dest]
    return attack_parameters(attack)[param]


def _flag_values(request: EvalRequest) -> dict[str, Any]:
    """The request's value of each of ``_FLAGS``."""
    return {"steps": request.steps, "restarts": request.restarts, "loss": request.loss, "aa_steps": request.aa_steps,
            "aa_queries": request.aa_queries, "apgd_steps": request.apgd_steps,
            "square_queries": request.square_queries}


def attack_options(request: EvalRequest) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(attack, spec fields, extra keywords) for each of ``--attacks``, from the flags each attack takes.

    A flag set away from its neutral value that no listed attack takes is a ConfigError naming the
    attacks and what they take (``--restarts 5`` with square, ``--steps`` with autoattack).
    """
    attacks = [a.strip() for a in request.attacks.split(",") if a.strip()]
    if not attacks:
        raise ConfigError("--attacks is empty; give e.g. --attacks pgd,autoattack")
    choices = [n for n in ATTACKS.names() if n != "none"]
    for name in attacks:
        if name not in choices:
            raise ConfigError(f"unknown attack {name!r}; choose from {', '.join(choices)}")
    given = {dest: value for dest, value in _flag_values(request).items() if value != _neutral(dest)}
    used = set(_SANITY_FLAGS) & set(given) if request.sanity else set()
    out = []
    for name in attacks:
        accepted = takes(name)
        fields: dict[str, Any] = {"steps": default_of(EvalConfig, "steps")} if "steps" in accepted else {}
        extra: dict[str, Any] = {}
        for dest, value in given.items():
            param, only = _FLAGS[dest]
            if param in accepted and (only is None or name in only):
                (fields if param in _SPEC_FIELDS else extra)[param] = value
                used.add(dest)
        out.append((name, fields, extra))
    for dest in given.keys() - used:
        only = _FLAGS[dest][1]
        raise ConfigError(f"--{dest.replace('_', '-')} {given[dest]} does not apply to --attacks {','.join(attacks)}"
                          + (f" (it is for {', '.join(only)})" if only else "") + ": "
                          + "; ".join(f"{name} takes {', '.join(takes(name))}" for name in attacks))
    for name, fields, extra in out:  # the attack checks the values themselves (ranges, names)
        AttackSpec(attack=name, eps=0.0, norm=request.norm, **fields, extra=extra)
    return out


def build_specs(request: EvalRequest, eps_list: list[float]) -> list[AttackSpec]:
    return [AttackSpec(attack=name, eps=eps, norm=request.norm, **fields, extra=extra)
            for name, fields, extra in attack_options(request) for eps in eps_list]


def _bits(t: torch.Tensor) -> str:
    return "".join("1" if v else "0" for v in t.tolist())


def correct_under_all(rows: list[dict[str, Any]], count: int) -> list[bool]:
    """Per image: correct under every one of ``rows`` (eval.json result rows, as ``_bits`` wrote their
    ``correct``), each of which must have scored the report's ``count`` images."""
    bits = [r["correct"] for r in rows]
    if any(len(b) != count for b in bits):
        raise ValueError("eval.json's rows scored different images")
    return [all(b[i] == "1" for b in bits) for i in range(count)]


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(_bits(t).encode()).hexdigest()


def build_report(result: EvalResult, specs: list[AttackSpec], source: dict[str, Any], request: EvalRequest,
                 checks: list[sanity.Check] | None, seconds: float) -> dict[str, Any]:
    rows = []
    for spec in specs:
        correct = result.robust_correct[spec.label]
        rows.append({"attack": spec.attack, "label": spec.label, "eps": spec.eps, "norm": spec.norm,
                     "steps": spec.steps, "restarts": spec.restarts, "step_size": spec.effective_step_size,
                     "loss": spec.loss, "extra": spec.extra,
                     "clean_acc": result.clean_acc, "robust_acc": result.robust_acc(spec.label),
                     "stages": result.stage_acc(spec.label),  # AutoAttack: robust acc after each stage, cumulative
                     "count": result.count, "seconds": result.seconds[spec.label],
                     "correct_sha256": _sha(correct), "correct": _bits(correct)})
    return {
        "source": source, "world_size": dist.world_size(), "seed": request.seed, "batch_size": request.batch_size,
        "max_examples": request.max_examples, "count": result.count, "clean_acc": result.clean_acc,
        "clean_correct_sha256": _sha(result.clean_correct), "clean_correct": _bits(result.clean_correct),
        "results": rows, "sanity": [c.to_dict() for c in checks] if checks is not None else None,
        "per_class": {str(c): v for c, v in result.per_class().items()},
        "seconds": seconds, "machine_note": "seconds are the slowest rank's attack time",
        "provenance": provenance(world_size=dist.world_size(), hosts=dist.hosts()),
    }


def stage_lines(report: dict[str, Any]) -> list[str]:
    """The reference AutoAttack's report for each row that ran in stages: its initial (clean) accuracy, then
    ``robust accuracy after APGD-CE: 54.69 % (35/64)`` after each stage, cumulative."""
    lines = []
    for row in report["results"]:
        if not row["stages"]:
            continue
        head = f"{row['label'].rsplit('@', 1)[0]} at eps {eps_text(row['eps'])}: "
        lines.append(head + f"initial accuracy: {percent(row['clean_acc'], row['count'])}")
        lines += [head + f"robust accuracy after {STANDARD_STAGES.get(stage, stage)}: {percent(acc, row['count'])}"
                  for stage, acc in row["stages"].items()]
    return lines


def plot_curves(report: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: dict[str, list[tuple[float, float]]] = {}
    for row in report["results"]:
        name = row["label"].rsplit("@", 1)[0]
        curves.setdefault(name, []).append((row["eps"], row["robust_acc"]))
    if len({row["eps"] for row in report["results"]}) == 1:  # one eps: a bar per attack, not one dot per line
        eps = eps_text(report["results"][0]["eps"])
        save_bar_plot(path, list(curves), [pts[0][1] for pts in curves.values()], ylabel=f"robust accuracy at eps={eps}",
                      title=title, hline=report["clean_acc"], hline_label="clean")
        return
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


ROBUSTBENCH_JSON = "robustbench.json"
_RB_DATASETS = {"cifar10": "cifar10", "cifar100": "cifar100"}  # RobustBench's names; ImageNet comes as imagefolder/hf


def read_subset(path: str, n: int) -> list[int]:
    """``--subset-file``: distinct test-set indices in [0, n), whitespace or comma separated (``core.io.read_indices``,
    which ``launch.validate`` ran without ``n`` before anything loaded)."""
    return read_indices(path, f"--subset-file {path!r}", n)


def check_deterministic(model: torch.nn.Module, dataset, n: int = 32) -> None:
    """RobustBench scores deterministic models only: two eval-mode forward passes on one batch must agree
    bit for bit (a randomised defence fails here, in one line)."""
    from ..attacks import eval_mode

    x = torch.stack([dataset[i][0] for i in range(min(n, len(dataset)))]).to(dist.device())
    with eval_mode(model), torch.no_grad():
        first, second = model(x), model(x)
    if not torch.equal(first, second):
        diff = float((first - second).abs().max())
        raise ConfigError(f"the model is not deterministic (two forward passes on the same batch differ by up to "
                          f"{diff:.3g}); --protocol robustbench scores deterministic models only, randomised "
                          "defences are out of scope")


def _eps_text(eps: float) -> str | float:
    k = eps * 255
    return f"{round(k)}/255" if abs(k - round(k)) < 1e-6 else eps


def eps_text(eps: float) -> str:
    """``8/255`` when eps is a whole number of 255ths (as papers and RobustBench write it), else ``0.1``."""
    return str(_eps_text(eps)) if eps else "0"


def percent(acc: float, count: int) -> str:
    """``54.69 % (35/64)``: an accuracy as the reference tools print it, with the examples behind it."""
    return f"{100 * acc:.2f} % ({round(acc * count)}/{count})"


def robustbench_entry(report: dict[str, Any], loaded: LoadedModel, request: EvalRequest, n_test: int,
                      subset: list[int] | None) -> dict[str, Any]:
    """RobustBench's ``model_info`` fields (``robustbench.utils.ModelInfo``; accuracies as percent strings
    with two decimals, as its ``update_json`` writes them), plus how this score was obtained."""
    row = report["results"][0]
    cfg, source = loaded.cfg, loaded.source
    name = request.entry_name or (Path(source["run_dir"]).name if source.get("run_dir") else Path(source["weights"]).stem)
    arch = source.get("model")
    if cfg is not None and cfg.model.act != "relu":
        arch = f"{arch} ({cfg.model.act})"
    shortened = request.max_examples is not None and report["count"] < (len(subset) if subset else n_test)
    return {
        "link": None, "name": name, "authors": None,
        "additional_data": bool(cfg.data.unlabeled) if cfg is not None else None,
        "number_forward_passes": 1, "dataset": _RB_DATASETS.get(loaded.data_cfg.name, loaded.data_cfg.name),
        "venue": None, "architecture": arch, "eps": _eps_text(row["eps"]),
        "clean_acc": f"{100 * report['clean_acc']:.2f}", "reported": None,
        "autoattack_acc": f"{100 * row['robust_acc']:.2f}", "footnote": None,
        "threat_model": {"linf": "Linf", "l2": "L2"}[row["norm"]],  # RobustBench's folder: model_info/<dataset>/<threat>/
        "protocol": "robustbench", "attack": row["label"], "n_examples": report["count"],
        "test_set_size": n_test, "subset_file": request.subset_file,
        "subset": report["count"] if shortened else None,  # set: NOT a RobustBench score (--max-examples)
        "deterministic": True, "which_weights": source.get("which_weights"),
    }


def load_model(request: EvalRequest) -> LoadedModel:
    if request.run is not None:
        return load_classifier(request.run, request.tag, request.weights or "auto")  # --weights: ema | raw with --run
    return load_weights(request.weights, request.model, request.data or "fashion-mnist", request.data_root)


def main(request: EvalRequest) -> dict[str, Any]:
    """Evaluate on this process's rank (the world may be 1). Returns the report on every rank.

    ``request`` comes from ``dat-ds eval``'s arguments (``cli.args.eval_request``) and was checked by
    ``launch.validate``.
    """
    dist.setup_logging()
    robustbench = request.protocol == "robustbench"
    if robustbench:
        request = replace_request(request, attacks="autoattack")  # check_protocol allows nothing else
    attack_options(request)  # an argument an attack does not take fails here, before any model loads
    # Each rank attacks its own batches and the results meet once, at the end: the wait there is the ranks'
    # imbalance, which for AutoAttack (its cost follows how many points stay robust) can be many minutes.
    dist.init_distributed(timeout_s=EVAL_TIMEOUT_S)
    if request.threads:
        torch.set_num_threads(request.threads)
    else:
        dist.set_threads_per_rank()
    loaded = load_model(request)
    if request.data and request.run is not None:

        loaded.data_cfg = replace(loaded.data_cfg, name=request.data, root=request.data_root or loaded.data_cfg.root)
    test_set, spec = build_dataset(loaded.data_cfg, "test")
    model = loaded.model.to(dist.device())
    n_test, subset = len(test_set), None
    if robustbench:
        if request.subset_file:
            from torch.utils.data import Subset

            subset = read_subset(request.subset_file, n_test)
            test_set = Subset(test_set, subset)
        elif loaded.data_cfg.name in ("imagefolder", "hf"):
            log.warning("RobustBench scores ImageNet on a fixed 5,000-image validation subset; pass its index list "
                        "with --subset-file (it is not shipped), or this is not the leaderboard's protocol")
        check_deterministic(model, test_set)
    if request.eps is not None:
        eps_list = parse_eps(request.eps)
    elif loaded.cfg is not None:
        eps_list = [loaded.cfg.attack.eps]
    else:
        raise ConfigError("--eps is needed with --weights, e.g. --eps 0.1 or --eps 8/255")
    specs = build_specs(request, eps_list)
    plan = None
    all_specs = list(specs)
    if request.sanity:
        queries = request.square_queries if request.square_queries != _neutral("square_queries") else None
        plan = sanity.sanity_specs(eps_list[0], in_chans=spec.in_chans, steps=request.steps, norm=request.norm,
                                   square_queries=queries)
        for extra_spec in plan.specs():
            if extra_spec.label not in {s.label for s in all_specs}:
                all_specs.append(extra_spec)
    n = len(test_set) if request.max_examples is None else min(request.max_examples, len(test_set))
    log.info("evaluating %s%s on %d %s test examples, %d rank(s): %s", loaded.source.get("run_dir") or
             loaded.source.get("weights"),
             f" ({loaded.source['which_weights']} weights)" if "which_weights" in loaded.source else "", n,
             loaded.data_cfg.name, dist.world_size(), ", ".join(s.label for s in all_specs))
    t0 = time.perf_counter()
    with ui.progress_bar(n * len(all_specs), "eval") as advance:
        result = evaluate(model, test_set, all_specs, batch_size=request.batch_size, seed=request.seed,
                          max_examples=request.max_examples, on_batch=lambda k: advance(k * len(all_specs) * dist.world_size()))
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
    report = build_report(result, all_specs, loaded.source, request, checks, seconds)
    if robustbench:
        report["robustbench"] = robustbench_entry(report, loaded, request, n_test, subset)
    if dist.is_main_process():
        out = Path(request.out) if request.out else (Path(loaded.source["run_dir"]) if request.run else Path("eval_out"))
        atomic_write_json(out / EVAL_JSON, report)
        plot_curves(report, out / PLOT, f"{loaded.source.get('model')} on {loaded.data_cfg.name}")
        adversarial_grid(model, test_set, specs[0], out / ADV_EXAMPLES, seed=request.seed, classes=spec.classes)
        which = f", {loaded.source['which_weights']} weights" if "which_weights" in loaded.source else ""
        ui.show(ui.table(f"robust accuracy on {result.count} test examples ({dist.world_size()} rank(s){which})",
                         ["attack", "eps", "clean acc", "robust acc", "seconds"],
                         [(r["label"].rsplit("@", 1)[0], eps_text(r["eps"]), percent(r["clean_acc"], r["count"]),
                           percent(r["robust_acc"], r["count"]), r["seconds"]) for r in report["results"]]))
        for line in stage_lines(report):
            log.info("%s", line)
        if request.per_class:
            ui.show(ui.table("accuracy per class", ["class", "clean acc", *(r["label"].rsplit("@", 1)[0] for r in
                                                                          report["results"])],
                             [(c, percent(v["clean_acc"], v["count"]),
                               *(percent(v["robust_acc"][r["label"]], v["count"]) for r in report["results"]))
                              for c, v in report["per_class"].items()]))
        if checks is not None:
            for c in checks:
                (log.info if c.status == "pass" else log.warning)("sanity %s: %s: %s", c.status.upper(), c.check, c.detail)
        log.info("wrote %s, %s and %s", out / EVAL_JSON, out / PLOT, out / ADV_EXAMPLES)
        if robustbench:
            entry = report["robustbench"]
            atomic_write_json(out / ROBUSTBENCH_JSON, entry)
            log.info("RobustBench entry (%s, %s %s): clean %s%%, AutoAttack %s%% on %d examples; wrote %s",
                     entry["dataset"], entry["threat_model"], entry["eps"], entry["clean_acc"], entry["autoattack_acc"],
                     entry["n_examples"], out / ROBUSTBENCH_JSON)
            if entry["subset"] is not None:
                log.warning("NOT A ROBUSTBENCH SCORE: --max-examples %d scored only the first %d of %d test examples; "
                            "RobustBench uses all of them (ImageNet: its fixed 5,000-image list)", request.max_examples,
                            entry["subset"], len(subset) if subset else n_test)
    dist.barrier()
    return report
