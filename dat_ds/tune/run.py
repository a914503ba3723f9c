"""``dat-ds tune``: the search (``search.py``) with real measurements (``measure.py``), and what it writes.

``run(inputs, start_ranks)``: plan (the starting point, the space, the output paths), search under the
budget with every result saved as it comes, write the best JSON, then the table and the plot.

Outputs: the tuned DeepSpeed JSON (plain: ``dat-ds train`` and the ``deepspeed`` launcher take it as is),
``<json>.tuning.json`` beside it (every measured point, the hardware, versions, the command; also the
cache an interrupted tune resumes from), a table sorted by samples/s and ``<json>.png``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ..core.errors import ConfigError, Interrupted
from ..core.io import atomic_write_json
from . import search
from .measure import EngineMeasure, StartRanks
from .search import OK, Point, Result

if TYPE_CHECKING:
    from ..core.config import RunConfig

log = logging.getLogger(__name__)

# Of the budget, the search may start points until (1 - RESERVE) of it has passed and must have its
# results by the budget's end (the ranks stop a point that runs late); the last RESERVE_S seconds and the
# 10 % over are for stopping the ranks, the files, the table and the plot.
RESERVE, RESERVE_S = 0.05, 8.0


# ----------------------------------------------------------------------------- the space


@dataclasses.dataclass(frozen=True)
class Inputs:
    """Everything the CLI validated (torch-free) before anything is measured."""

    recipe: str | None
    recipe_name: str
    recipe_arg: str  # as the user wrote it (a shipped recipe's name stays a name)
    sets: tuple[str, ...]
    ds_path: str
    base_json: dict[str, Any]
    nproc: int
    hostfile: str | None
    nodes: int
    budget_s: float
    allow_numerics_change: bool
    allow_batch_change: bool
    out: str | None
    memory_cap_mb: float | None
    command: tuple[str, ...]


def _shown_path(path: str) -> str:
    """A packaged recipe as ``dat_ds/recipes/<name>``, a user's file as given: no machine's folders in the sidecar."""
    from pathlib import Path

    p = Path(path).resolve()
    package = Path(__file__).resolve().parents[1]
    return str(Path("dat_ds") / p.relative_to(package)) if p.is_relative_to(package) else path

def start_point(inputs: Inputs, cfg, settings, threads: int) -> Point:
    return Point(micro=settings.micro_batch, accum=settings.grad_accum, global_batch=settings.global_batch,
                 zero=settings.zero_stage, precision=settings.precision,
                 comm=search.json_comm({**settings.ds_config, "optimizer": settings.optimizer,
                                      "gradient_compression": settings.gradient_compression}, settings.compresses),
                 channels_last=cfg.model.channels_last, workers=cfg.data.num_workers, ranks=inputs.nproc,
                 threads=threads)


def build_space(inputs: Inputs, start: Point, *, cpu: bool, cores: int, family: str) -> search.Space:
    n = inputs.nproc
    layouts = [start.layout]
    if cpu and not inputs.hostfile:  # ranks x threads within this machine's cores
        layouts += [(r, max(1, cores // r)) for r in range(n - 1, 0, -1) if n % r == 0]
        layouts += [(n, t) for t in (1,) if t < start.threads]
    world_min = min(r for r, _ in layouts) * inputs.nodes
    batches = [start.global_batch]
    if inputs.allow_batch_change:
        world = n * inputs.nodes
        batches += [b for b in (start.global_batch // 2, start.global_batch * 2, start.global_batch * 4)
                    if b >= world and b % world == 0 and b != start.global_batch]
    micro = search.powers_of_two(max(batches) // world_min, also=[start.micro])
    precisions = [start.precision]
    comms = [start.comm]
    if inputs.allow_numerics_change:
        precisions += [p for p in ("fp32", "bf16") if p != start.precision]
        if n * inputs.nodes > 1:  # nothing to communicate on one rank
            comms += [c for c in ("none", "dat8", *search.ONEBIT_FAMILY.get(family, ())) if c != start.comm]
    workers = [start.workers] + [w for w in (0, 1, 2) if w != start.workers and (not cpu or w < cores)]
    return search.Space(micro=micro, zero=[start.zero] + [z for z in range(4) if z != start.zero],
                      precision=precisions, comm=comms, channels_last=[start.channels_last, not start.channels_last],
                      workers=workers, layout=layouts, global_batch=batches if len(batches) > 1 else (),
                      nodes=inputs.nodes)


def validator(inputs: Inputs, start: Point, family: str, lr_rule: str) -> Callable[[Point], str | None]:
    """The project's DeepSpeed-JSON validation of each point's JSON, before it is measured."""
    from ..runtime import ds_config

    def validate(p: Point) -> str | None:
        d = search.point_ds_json(inputs.base_json, start, p, optimizer_family=family, lr_rule=lr_rule)
        try:
            ds_config.prepare(f"tuned point {p.label()}", p.ranks * inputs.nodes, data=d)
        except ConfigError as e:
            return str(e)
        return None

    return validate


# ----------------------------------------------------------------------------- the run


def context_key(inputs: Inputs, hardware: dict[str, Any]) -> str:
    """What a cached point depends on: the recipe and JSON (contents), ranks, --set, the flags, the machine."""
    recipe_text = Path(inputs.recipe).read_text() if inputs.recipe else ""
    parts = [recipe_text, json.dumps(inputs.base_json, sort_keys=True), inputs.nproc, inputs.nodes, list(inputs.sets),
             inputs.allow_numerics_change, inputs.allow_batch_change, inputs.memory_cap_mb,
             {k: hardware[k] for k in ("device", "cores", "torch", "deepspeed")}]
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def hardware_info() -> dict[str, Any]:
    import platform

    import deepspeed
    import psutil
    import torch

    from ..core import dist

    cpu = dist.accelerator().device_name() == "cpu"
    device = "cpu" if cpu else torch.cuda.get_device_name(0)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return {"device": device, "device_count": 0 if cpu else torch.cuda.device_count(), "cores": cores,
            "memory_mb": psutil.virtual_memory().total / 2**20, "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "backend": dist.accelerator().communication_backend_name()}


def device_tag(hardware: dict[str, Any]) -> str:
    name = hardware["device"].lower().replace("nvidia", "").strip()
    return "".join(c if c.isalnum() else "-" for c in name).strip("-") or "device"


def default_out(recipe_name: str, world: int, hardware: dict[str, Any]) -> Path:
    return Path("ds_configs") / "tuned" / f"{recipe_name}-{world}x{device_tag(hardware)}.json"


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one tune measures and where it writes: the inputs read against this machine."""

    hardware: dict[str, Any]
    cfg: RunConfig  # the recipe's, with --set applied
    start: Point
    space: search.Space
    family: str  # the starting JSON's optimizer family
    lr_rule: str  # the recipe's LR scaling rule, applied to a changed global batch
    out: Path  # the tuned JSON
    sidecar: Path  # <out>.tuning.json: every point, and the cache a resume reads
    key: str  # context_key: a cached point counts only under the same one
    rss_cap_mb: float | None  # CPU: resident memory per rank over which a point counts as out of memory

    @property
    def cpu(self) -> bool:
        return self.hardware["device"] == "cpu"


def plan_tune(inputs: Inputs) -> Plan:
    """The starting point, the space around it and the output paths (imports torch: reads the hardware)."""
    from ..core.config import build_config
    from ..optim.specs import check_optimizer_params
    from ..runtime import ds_config

    hardware = hardware_info()
    cpu = hardware["device"] == "cpu"
    cfg = build_config(inputs.recipe, list(inputs.sets))
    world = inputs.nproc * inputs.nodes
    settings = ds_config.prepare(inputs.ds_path, world, data=inputs.base_json)
    family, _ = check_optimizer_params(inputs.base_json["optimizer"])
    default_threads = max(1, hardware["cores"] // inputs.nproc) if cpu else 0
    start = start_point(inputs, cfg, settings, default_threads)
    space = build_space(inputs, start, cpu=cpu, cores=hardware["cores"], family=family)
    out = Path(inputs.out) if inputs.out else default_out(inputs.recipe_name, world, hardware)
    rss_cap = inputs.memory_cap_mb
    if rss_cap is None and cpu:  # resident memory per rank; over it a point counts as out of memory
        rss_cap = 0.8 * hardware["memory_mb"] / inputs.nproc
    return Plan(hardware=hardware, cfg=cfg, start=start, space=space, family=family, lr_rule=cfg.optim.lr_scaling,
                out=out, sidecar=out.with_name(out.stem + ".tuning.json"), key=context_key(inputs, hardware),
                rss_cap_mb=rss_cap)


def cached_points(sidecar: Path, key: str) -> dict[str, dict]:
    """The points an earlier tune of the same context measured (its sidecar's cache), else none."""
    if not sidecar.is_file():
        return {}
    try:
        old = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        log.warning("%s is not readable JSON; measuring from scratch", sidecar)
        return {}
    if old.get("context") != key:
        log.info("%s is from another recipe, JSON or machine; measuring from scratch", sidecar)
        return {}
    cache = dict(old.get("cache", {}))
    log.info("resuming: %d measured point(s) from %s", len(cache), sidecar)
    return cache


class Sidecar:
    """``<json>.tuning.json``, rewritten after every point: the inputs, the hardware, every measured point and
    the cache (the same dict the search fills) an interrupted tune resumes from."""

    def __init__(self, inputs: Inputs, plan: Plan, cache: dict[str, dict]):
        self.inputs, self.plan, self.cache = inputs, plan, cache
        self.record: dict[str, Any] = {}

    def save(self, measured: list[tuple[Point, Result, bool]], summary: dict[str, Any] | None = None) -> None:
        inputs, plan = self.inputs, self.plan
        self.record.update({
            "recipe": inputs.recipe_name, "recipe_path": _shown_path(inputs.recipe), "start_json": inputs.ds_path,
            "command": list(inputs.command), "hardware": plan.hardware, "context": plan.key, "cache": self.cache,
            "nproc": inputs.nproc, "nodes": inputs.nodes, "budget_s": inputs.budget_s,
            "allow_numerics_change": inputs.allow_numerics_change, "allow_batch_change": inputs.allow_batch_change,
            "memory_cap_mb": plan.rss_cap_mb, "space": dataclasses.asdict(plan.space),
            "points": [{"point": dataclasses.asdict(p), "label": p.label(), **r.to_json(),
                        "cached": c} for p, r, c in measured],
        })
        if summary is not None:
            self.record["summary"] = summary
        atomic_write_json(self.plan.sidecar, self.record)


def run(inputs: Inputs, start_ranks: StartRanks) -> dict[str, Any]:
    """Measure, search, write the JSON + sidecar + PNG, show the table; returns the sidecar's content.

    ``start_ranks`` starts the measuring ranks (``cli.tune.start_ranks``)."""
    t_start = time.time()
    budget = search.Budget(inputs.budget_s * (1 - RESERVE) - RESERVE_S, time.monotonic)
    plan = plan_tune(inputs)
    sidecar = Sidecar(inputs, plan, cached_points(plan.sidecar, plan.key))
    plan.out.parent.mkdir(parents=True, exist_ok=True)
    exchange = Path(tempfile.mkdtemp(prefix=".tune-", dir=plan.out.parent))
    # measurements stop at the budget; what follows (files, table, plot) takes a few seconds of the 10 %
    measure = EngineMeasure(start_ranks, recipe=inputs.recipe, sets=list(inputs.sets), hostfile=inputs.hostfile,
                            base_json=inputs.base_json, start=plan.start, optimizer_family=plan.family,
                            lr_rule=plan.lr_rule, deadline=time.time() + inputs.budget_s - RESERVE_S,
                            rss_cap_mb=plan.rss_cap_mb, exchange=exchange, hard_end=time.time() + inputs.budget_s)
    done, outcome = _search(inputs, plan, measure, budget, sidecar, exchange)
    summary = _write_tuned_json(inputs, plan, measure, outcome, seconds=time.time() - t_start)
    sidecar.save(done, summary)
    measure.wait_closed(5.0)
    shutil.rmtree(exchange, ignore_errors=True)
    _plot(plan.out.with_suffix(".png"), done, plan.start, outcome.best)
    _table(done, plan.start, outcome.best, inputs.recipe_name)
    _say(summary, plan.start, summary["lr_note"], inputs)
    return sidecar.record


def _search(inputs: Inputs, plan: Plan, measure: EngineMeasure, budget: search.Budget, sidecar: Sidecar,
            exchange: Path) -> tuple[list[tuple[Point, Result, bool]], search.Outcome]:
    """The search under a progress bar, each result saved as it comes. Ctrl-C or SIGTERM stops the ranks and
    raises ``Interrupted`` (the measured points stay cached); a search in which no point ran is a ConfigError."""
    import signal

    done: list[tuple[Point, Result, bool]] = []
    planned = search.planned_points(plan.space)
    with _progress(budget) as bar:
        def on_result(p: Point, r: Result, cached: bool) -> None:
            done.append((p, r, cached))
            sidecar.save(done)
            sps = f"{r.samples_per_s:.1f} samples/s" if r.samples_per_s else r.message[:80]
            log.info("%-40s %-7s %s%s", p.label(), r.status, sps, " (cached)" if cached else "")
            bar(len(done), planned, p.label())

        def on_plan(n: int) -> None:
            nonlocal planned
            planned = max(n, len(done))
            bar(len(done), planned, None)

        previous = signal.signal(signal.SIGTERM, _raise_signal)  # a SIGTERM ends the tune like Ctrl-C
        try:
            outcome = search.search(plan.start, plan.space, measure, budget=budget, cache=sidecar.cache,
                                    validate=validator(inputs, plan.start, plan.family, plan.lr_rule),
                                    on_result=on_result, on_plan=on_plan)
        except (KeyboardInterrupt, _Signal) as e:
            measure.close(wait=True)
            shutil.rmtree(exchange, ignore_errors=True)
            signum = e.signum if isinstance(e, _Signal) else signal.SIGINT
            raise Interrupted(signum, f"interrupted after {len(done)} point(s); they are cached in {plan.sidecar}: "
                                      "run the same command again to resume") from None
        finally:
            signal.signal(signal.SIGTERM, previous)
            measure.close(wait=False)
        if outcome.best_sps is None:
            sidecar.save(done)
            measure.wait_closed(5.0)
            shutil.rmtree(exchange, ignore_errors=True)
            raise ConfigError(f"no point ran (the first: {done[0][1].message if done else 'none measured'}); "
                              f"see {plan.sidecar}")
    return done, outcome


def _write_tuned_json(inputs: Inputs, plan: Plan, measure: EngineMeasure, outcome: search.Outcome, *,
                      seconds: float) -> dict[str, Any]:
    """The best point's JSON, validated at its world size, written to ``plan.out``; returns the summary."""
    from ..runtime import ds_config

    out, start, best = plan.out, plan.start, outcome.best
    best_json = measure.ds_json(best)
    ds_config.prepare(str(out), best.ranks * inputs.nodes, data=best_json)  # what we write passes, always
    atomic_write_json(out, best_json)
    note = search.lr_note(start, best, plan.lr_rule, plan.cfg.optim.base_batch_size,
                          best_json["optimizer"].get("params", {}).get("lr"))
    run_sets = _run_config_sets(start, best)
    return {
        "tuned_json": str(out), "best": dataclasses.asdict(best), "best_label": best.label(),
        "start": dataclasses.asdict(start), "start_label": start.label(), "start_samples_per_s": outcome.start_sps,
        "best_samples_per_s": outcome.best_sps, "expected_speedup": outcome.speedup,
        "default_is_best": outcome.default_is_best, "stopped_by_budget": outcome.stopped_by_budget,
        "confirm_rounds": [[{"label": p.label(), "samples_per_s": s} for p, s in rnd] for rnd in outcome.confirm_rounds],
        "confirm": _confirm_line(inputs, best, out, run_sets),
        "lr_note": note, "run_config_sets": run_sets, "launch": _launch_line(inputs, best, out, run_sets, plan.cpu),
        "seconds": seconds,
    }


class _Signal(Exception):
    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_signal(signum, frame):
    raise _Signal(signum)


def _run_config_sets(start: Point, best: Point) -> list[str]:
    """Settings of the run config (not the JSON, which owns only the engine) that the tuned point changes."""
    sets = []
    if best.channels_last != start.channels_last:
        sets.append(f"model.channels_last={str(best.channels_last).lower()}")
    if best.workers != start.workers:
        sets.append(f"data.num_workers={best.workers}")
    return sets


def _confirm_line(inputs: Inputs, best: Point, out: Path, sets: list[str]) -> str:
    """The side-by-side benchmark of the tuned point (JSON, run-config sets, ranks) against the start."""
    extra = "".join(f" --a-set {s}" for s in sets)
    ranks = f" --vs-nproc {inputs.nproc}" if best.ranks != inputs.nproc else ""
    return (f"dat-ds bench engine --recipe {inputs.recipe_arg} --nproc {best.ranks}{ranks} --deepspeed_config {out} "
            f"--vs {inputs.ds_path}{extra}" + "".join(f" --set {s}" for s in inputs.sets))


def _launch_line(inputs: Inputs, best: Point, out: Path, sets: list[str], cpu: bool) -> str:
    env = f"DAT_DS_THREADS_PER_RANK={best.threads} " if cpu and best.threads and \
        best.threads != max(1, (os.cpu_count() or 1) // best.ranks) else ""
    host = f" --hostfile {inputs.hostfile}" if inputs.hostfile else ""
    extra = "".join(f" --set {s}" for s in sets)
    return (f"{env}dat-ds train --recipe {inputs.recipe_arg} --nproc {best.ranks}{host} "
            f"--deepspeed_config {out}{extra}")


class _progress:
    """A rich bar: points done / planned, and the budget left."""

    def __init__(self, budget: search.Budget):
        self.budget = budget

    def __enter__(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        from ..core import ui

        if not sys.stdout.isatty():
            return lambda done, planned, label: None
        self.bar = Progress(TextColumn("tune"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                            console=ui.console, transient=True)
        self.bar.__enter__()
        self.task = self.bar.add_task("", total=1)

        def update(done: int, planned: int, label: str | None) -> None:
            left = max(0.0, self.budget.left())
            self.bar.update(self.task, completed=done, total=max(planned, done, 1),
                            description=f"budget left {ui.clock(left)}"
                            + (f"  last: {label}" if label else ""))

        return update

    def __exit__(self, *exc):
        if hasattr(self, "bar"):
            self.bar.__exit__(*exc)
        return False


def _rows(done: list[tuple[Point, Result, bool]]) -> list[tuple[Point, Result]]:
    """One row per point, fastest first: its measurements together (median samples/s of the ok ones)."""
    import statistics

    by_point: dict[Point, list[Result]] = {}
    for p, r, _ in done:
        by_point.setdefault(p, []).append(r)
    rows = []
    for p, rs in by_point.items():
        ok = [r for r in rs if r.status == OK]
        if ok:
            r = dataclasses.replace(ok[-1], samples_per_s=statistics.median(r.samples_per_s for r in ok),
                                    step_s=[s for r in ok for s in r.step_s])
        else:
            r = rs[-1]
        rows.append((p, r))
    return sorted(rows, key=lambda t: (t[1].status != OK, -(t[1].samples_per_s or 0)))


def _table(done, start: Point, best: Point, recipe: str) -> None:
    from ..core import ui

    rows = []
    for p, r in _rows(done):
        mark = " (tuned)" if p == best else " (start)" if p == start else ""
        rows.append([p.label() + mark, r.status, r.samples_per_s if r.status == OK else None,
                     r.peak_mem_mb, len(r.step_s), r.message[:60] or None])
    ui.show(ui.table(f"dat-ds tune {recipe}: measured points, fastest first",
                     ["name", "status", "samples/s", "peak MB", "timed steps", "detail"], rows))


def _plot(path: Path, done, start: Point, best: Point) -> None:
    from ..core.io import save_bar_plot

    ok = [(p, r) for p, r in _rows(done) if r.status == OK][:20]
    if not ok:
        return
    labels = [p.label() + (" *" if p == best else "") for p, _ in ok]
    start_sps = next((r.samples_per_s for p, r in ok if p == start), None)
    save_bar_plot(path, labels, [r.samples_per_s for _, r in ok], ylabel="samples/s",
                  title="dat-ds tune: measured points (* tuned)", hline=start_sps,
                  hline_label="starting JSON" if start_sps else None)


def _say(summary: dict[str, Any], start: Point, note: str | None, inputs: Inputs) -> None:
    from ..core import ui

    speedup = summary["expected_speedup"]
    if summary["start_samples_per_s"] is None:
        ui.console.print(f"[bold]tuned:[/bold] {summary['best_label']}, {summary['best_samples_per_s']:.1f} samples/s; "
                         "the starting JSON itself did not run here (see the table)")
    elif summary["default_is_best"]:
        ui.console.print(f"[bold]the starting JSON is the best measured[/bold] ({start.label()}, "
                         f"{summary['start_samples_per_s']:.1f} samples/s): nothing beat it by 3 %; "
                         f"{summary['tuned_json']} is it, written out in full")
    else:
        ui.console.print(f"[bold]tuned:[/bold] {summary['best_label']}: expected speedup "
                         f"[bold]{speedup:.2f}x[/bold] over the starting JSON ({summary['best_samples_per_s']:.1f} vs "
                         f"{summary['start_samples_per_s']:.1f} samples/s)")
    engine_fields = ("micro", "accum", "global_batch", "zero", "precision", "comm")
    best = Point(**summary["best"])
    if not summary["default_is_best"] and all(getattr(best, f) == getattr(start, f) for f in engine_fields):
        ui.console.print("note: the engine settings are the starting JSON's; the gain comes from the run config or "
                         "the launch (ranks x threads), so use the command line below, not the JSON alone")
    if note:
        ui.console.print(f"note: {note}")
    if summary["stopped_by_budget"]:
        ui.console.print("note: the budget ended the search; run the same command again to continue it (cached)")
    ui.console.print(f"wrote {summary['tuned_json']} (+ .tuning.json, .png); run it with:\n  {summary['launch']}\n"
                     f"confirm: {summary['confirm']}")
