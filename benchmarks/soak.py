"""``dat-ds bench soak``: one long training run with everything that could leak turned on, watched from outside.

What runs: ``dat-ds train`` through the one launcher (``launch()``) on ``--nproc`` ranks: tiny_cnn on the first
``--subset`` images of the embedded Fashion-MNIST, ``--epochs`` epochs (default 200) of
``subset / (micro-batch x nproc)`` steps, with

* a mid-epoch checkpoint every ``--save-every`` steps plus one per epoch, ``train.keep_last`` rotation;
* weight EMA, evaluated next to the raw weights;
* ``attack.reuse`` (ATTA: each example's last perturbation, kept per rank and saved in every checkpoint);
* ``data.num_workers`` loader processes per rank (forked again every epoch: ``persistent_workers=False``);
* a clean evaluation every epoch, PGD every ``--eval-every`` epochs, a ``metrics.jsonl`` step record every step.

Sampled every ``--interval`` s from this process, through Linux's ``/proc`` (nothing is asked of the ranks):

* the rank processes (this process's descendants running ``dat_ds.train`` whose parent does not) and their
  loader workers (the ranks' descendants): resident memory (``VmRSS``) and open file descriptors;
* the run folder's disk use and its ``checkpoint/`` folder's (allocated blocks, as ``du``);
* step time: each new step record of ``metrics.jsonl`` (global batch / ``samples_per_s``, one step per record);
* ``/proc/loadavg`` (the machine may be shared: step-time noise grows with the load).

Each series gets a verdict from :func:`trend` (``RULE`` says how; it can fail: ``tests/bench/test_soak.py``
feeds it growing and flat series), and the checkpoint folder's largest size is compared with what
``keep_last`` allows: ``keep_last + 1`` checkpoints (a save writes the new one before the oldest is removed).
Writes ``soak.json`` (no machine paths in it) and ``soak.png`` (the four series against time).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

RANK_MODULE = "dat_ds.train"  # what launch() starts on every rank: `python -u -m dat_ds.train ...`
SMALL_FILES_SLACK = 64 * 1024  # `latest` and its temporary twin, next to the checkpoints (allocated blocks)
NOISE_FACTOR = 3.0
CONFIG_KEYS = ("epochs", "nproc", "subset", "micro_batch", "save_every", "keep_last", "workers", "eval_every",
               "interval", "warmup_share")
# The smallest growth over the run that counts, per series, next to 3x its noise: below it a rise is too small
# to matter even when it is steady (one allocator arena, one lazily opened file).
MIN_CHANGE = {"rss": ("relative", 0.01), "fds": ("absolute", 1.0), "disk": ("checkpoint", 1.0),
              "step_time": ("relative", 0.10)}
RULE = ("After the warm-up (the first --warmup-share of the training time, between the first and the last step "
        "record; start-up and the final evaluation are outside too), a series 'grows' when all three hold: "
        "(1) its least-squares slope's 95% interval lies above 0 (standard error widened by sqrt(n / n_eff), "
        "n_eff = n (1 - r1) / (1 + r1), r1 the residuals' lag-1 autocorrelation: samples 1 s apart are not "
        "independent); (2) the median of the last third of the window exceeds the median of the first third by "
        "more than the threshold; (3) slope x window length exceeds the threshold. Threshold = max(3 x noise, "
        "min_change), noise = 1.4826 x MAD of the residuals from the line (a robust standard deviation; a curve the "
        "line fits badly, e.g. a rise that stops early in the window, has a large one), "
        "min_change: rss 1% of the first third's median, fds 1 descriptor, disk one checkpoint, step_time 10% "
        "of the first third's median. Otherwise 'flat' ('too short' under 9 samples).")


# ----------------------------------------------------------------------------- the trend test (pure)


def trend(t: list[float], y: list[float], *, start: float, end: float, min_change: float) -> dict[str, Any]:
    """The verdict of ``RULE`` on the samples ``(t, y)`` with ``start <= t <= end``: 'grows', 'flat' or 'too short'."""
    import numpy as np

    pts = [(a, b) for a, b in zip(t, y) if start <= a <= end and b is not None]
    out: dict[str, Any] = {"window_s": [start, end], "n": len(pts), "min_change": min_change}
    if len(pts) < 9:
        return {**out, "verdict": "too short"}
    x, v = np.array([p[0] for p in pts], float), np.array([p[1] for p in pts], float)
    xc = x - x.mean()
    sxx = float((xc**2).sum())
    slope = float((xc * (v - v.mean())).sum() / sxx) if sxx > 0 else 0.0
    resid = v - (v.mean() + slope * xc)
    n = len(v)
    r1 = 0.0
    if float((resid**2).sum()) > 0:
        r1 = float((resid[1:] * resid[:-1]).sum() / (resid**2).sum())
    r1 = min(max(r1, 0.0), 0.99)
    n_eff = max(n * (1 - r1) / (1 + r1), 3.0)
    se = (float((resid**2).sum()) / (n - 2) / sxx) ** 0.5 * (n / n_eff) ** 0.5 if sxx > 0 else float("inf")
    ci = [slope - 1.96 * se, slope + 1.96 * se]
    noise = 1.4826 * float(np.median(np.abs(resid - np.median(resid))))
    third = n // 3
    first, last = float(np.median(v[:third])), float(np.median(v[-third:]))
    span = float(x[-1] - x[0])
    threshold = max(NOISE_FACTOR * noise, min_change)
    grows = ci[0] > 0 and last - first > threshold and slope * span > threshold
    return {**out, "slope_per_s": slope, "slope_ci95_per_s": ci, "mean_t": float(x.mean()), "mean": float(v.mean()),
            "lag1_autocorr": r1, "n_effective": n_eff,
            "fitted_change": slope * span, "first_third_median": first, "last_third_median": last,
            "thirds_change": last - first, "noise": noise, "threshold": threshold,
            "verdict": "grows" if grows else "flat"}


def min_change_of(series: str, first_values: list[float], checkpoint_bytes: float) -> float:
    """``MIN_CHANGE[series]`` in the series' units (relative ones from the median of ``first_values``)."""
    kind, amount = MIN_CHANGE[series]
    if kind == "relative":
        return amount * statistics.median(first_values) if first_values else 0.0
    if kind == "checkpoint":
        return amount * checkpoint_bytes
    return amount


# ----------------------------------------------------------------------------- /proc and the disk


def proc_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process this user can see."""
    table: dict[int, tuple[int, str]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
            cmdline = Path(entry.path, "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone between the listing and the read
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # the command name in (...) may hold spaces
        table[int(entry.name)] = (ppid, cmdline)
    return table


def descendants(table: dict[int, tuple[int, str]], root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = [], list(children.get(root, []))
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return sorted(found)


def rank_processes(table: dict[int, tuple[int, str]], root: int) -> tuple[list[int], list[int]]:
    """(rank PIDs, loader-worker PIDs) under ``root``: a rank runs ``RANK_MODULE`` and its parent does not (a
    forked DataLoader worker has its rank's command line); a worker is any descendant of a rank."""
    under = descendants(table, root)

    def runs_rank(pid: int) -> bool:
        return f"-m {RANK_MODULE} " in table[pid][1] + " "

    ranks = [p for p in under if runs_rank(p) and not (table[p][0] in table and runs_rank(table[p][0]))]
    workers = sorted(w for r in ranks for w in descendants(table, r))
    return ranks, workers


def rss_and_fds(pid: int) -> tuple[int, int] | None:
    """(VmRSS bytes, open file descriptors) of ``pid``; None once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
    rss = next((int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS:")), None)
    return None if rss is None else (rss, fds)  # a zombie has no VmRSS


def disk_bytes(path: Path) -> int:
    """Allocated bytes under ``path`` (as ``du``; the folder's own blocks excluded), files vanishing meanwhile."""
    total = 0
    stack = [str(path)]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue
        for e in entries:
            try:
                st = e.stat(follow_symlinks=False)
            except OSError:
                continue
            total += st.st_blocks * 512
            if e.is_dir(follow_symlinks=False):
                stack.append(e.path)
    return total


def loadavg() -> list[float]:
    return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]


# ----------------------------------------------------------------------------- the sampler


@dataclass
class Samples:
    """Everything the sampler saw; ``t`` in seconds since the benchmark started."""

    t: list[float] = field(default_factory=list)
    # per rank process, in the order first seen (None: not running at that sample); ``rank_pids`` names them
    rss_ranks: list[list[int | None]] = field(default_factory=list)
    fds_ranks: list[list[int | None]] = field(default_factory=list)
    workers: list[int] = field(default_factory=list)  # loader workers alive
    rss_workers: list[int] = field(default_factory=list)  # summed over them
    fds_workers: list[int] = field(default_factory=list)
    disk_run: list[int] = field(default_factory=list)
    disk_checkpoint: list[int] = field(default_factory=list)
    checkpoints: list[int] = field(default_factory=list)  # committed tags + saves in flight
    load1: list[float] = field(default_factory=list)
    rank_pids: list[int] = field(default_factory=list)
    step_t: list[float] = field(default_factory=list)  # when the step record was first seen
    step: list[int] = field(default_factory=list)
    epoch: list[int] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)


class Sampler(threading.Thread):
    """Polls the ranks under this process, the run folder and its ``metrics.jsonl`` every ``interval`` s."""

    def __init__(self, run_dir: Path, *, global_batch: int, interval: float, t0: float):
        super().__init__(daemon=True, name="soak-sampler")
        self.run_dir, self.global_batch, self.interval, self.t0 = run_dir, global_batch, interval, t0
        self.samples = Samples()
        self.stopped = threading.Event()
        self._offset = 0

    def run(self) -> None:
        while not self.stopped.is_set():
            self.sample()
            self.stopped.wait(self.interval)
        self.sample()  # the step records written since the last poll

    def sample(self) -> None:
        s, now = self.samples, time.monotonic() - self.t0
        self._read_steps(now)
        ranks, workers = rank_processes(proc_table(), os.getpid())
        seen = {p: m for p in ranks if (m := rss_and_fds(p)) is not None}
        if not seen:  # before the ranks start and after they end: nothing to watch
            return
        s.rank_pids.extend(p for p in seen if p not in s.rank_pids)
        per_rank = [seen.get(p) for p in s.rank_pids]
        per_worker = [m for m in (rss_and_fds(p) for p in workers) if m is not None]
        ckpt = self.run_dir / "checkpoint"
        s.t.append(round(now, 3))
        s.rss_ranks.append([None if m is None else m[0] for m in per_rank])
        s.fds_ranks.append([None if m is None else m[1] for m in per_rank])
        s.workers.append(len(per_worker))
        s.rss_workers.append(sum(m[0] for m in per_worker))
        s.fds_workers.append(sum(m[1] for m in per_worker))
        s.disk_run.append(disk_bytes(self.run_dir))
        s.disk_checkpoint.append(disk_bytes(ckpt))
        s.checkpoints.append(sum(1 for d in ckpt.iterdir() if d.is_dir()) if ckpt.is_dir() else 0)
        s.load1.append(loadavg()[0])

    def _read_steps(self, now: float) -> None:
        path = self.run_dir / "metrics.jsonl"
        try:
            with open(path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except OSError:
            return
        whole = data[:data.rfind(b"\n") + 1]  # a line still being written waits for the next poll
        self._offset += len(whole)
        for line in whole.splitlines():
            record = json.loads(line)
            if record.get("kind") == "step" and record.get("samples_per_s"):
                self.samples.step_t.append(round(now, 3))
                self.samples.step.append(record["step"])
                self.samples.epoch.append(record["epoch"])
                self.samples.step_seconds.append(self.global_batch / record["samples_per_s"])


# ----------------------------------------------------------------------------- the run


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--epochs", type=int, default=200, help="training epochs (default 200)")
    p.add_argument("--nproc", type=int, default=2, help="ranks (default 2)")
    p.add_argument("--subset", type=int, default=512, help="training images (default 512: 16 steps an epoch on 2 ranks)")
    p.add_argument("--micro-batch", type=int, default=16, help="micro-batch per rank (default 16)")
    p.add_argument("--save-every", type=int, default=5, help="train.save_every_steps (default 5)")
    p.add_argument("--keep-last", type=int, default=3, help="train.keep_last (default 3)")
    p.add_argument("--workers", type=int, default=1, help="data.num_workers per rank (default 1)")
    p.add_argument("--eval-every", type=int, default=50, help="eval.every_epochs: PGD evaluation cadence (default 50)")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between samples (default 1)")
    p.add_argument("--warmup-share", type=float, default=0.1,
                   help="share of the training time left out of the trend tests (default 0.1)")
    p.add_argument("--runs-dir", default=None, help="keep the run in RUNS_DIR/soak (default: a temporary folder)")


def train_argv(args: argparse.Namespace, runs: Path) -> list[str]:
    sets = ["model.name=tiny_cnn", f"data.train_subset={args.subset}", f"data.num_workers={args.workers}",
            "attack.steps=2", "attack.reuse=true", "ema.decay=0.99",
            f"train.save_every_steps={args.save_every}", f"train.keep_last={args.keep_last}", "train.log_every=1",
            "eval.attack=pgd", "eval.steps=1", "eval.max_examples=16", "eval.batch_size=16",
            f"eval.every_epochs={args.eval_every}"]
    return ["--name", "soak", "--output-dir", str(runs), "--overwrite", "--ds-config", "zero0_fp32",
            "--ds-set", f"train_micro_batch_size_per_gpu={args.micro_batch}", "--epochs", str(args.epochs),
            *(a for s in sets for a in ("--set", s))]


def checkpoint_sizes(ckpt: Path) -> dict[str, int]:
    """Allocated bytes of each committed checkpoint left in ``ckpt`` (the folder's own block included)."""
    sizes = {}
    for d in sorted(ckpt.iterdir()) if ckpt.is_dir() else []:
        if d.is_dir() and (d / "complete.json").is_file():
            sizes[d.name] = disk_bytes(d) + d.stat().st_blocks * 512
    return sizes


def analyse(s: Samples, *, checkpoint_bytes: int, keep_last: int, warmup: float) -> dict[str, Any]:
    """Verdicts per series and the disk bound, from the samples (pure: the tests feed it made-up samples)."""
    if not s.step_t:
        raise RuntimeError("the soak run wrote no step record: nothing to judge")
    first_step, last_step = s.step_t[0], s.step_t[-1]
    start = first_step + warmup * (last_step - first_step)
    series = {"rss": (s.t, ranks_together(s.rss_ranks)), "fds": (s.t, ranks_together(s.fds_ranks)),
              "disk": (s.t, s.disk_checkpoint), "step_time": (s.step_t, s.step_seconds)}
    verdicts = {}
    for name, (t, y) in series.items():
        window = [v for a, v in zip(t, y) if start <= a <= last_step]
        floor = min_change_of(name, window[:max(len(window) // 3, 1)], checkpoint_bytes)
        verdicts[name] = trend(t, y, start=start, end=last_step, min_change=floor)
    bound = (keep_last + 1) * checkpoint_bytes + SMALL_FILES_SLACK
    most = max(s.disk_checkpoint, default=0)
    return {"warmup_ends_s": start, "first_step_s": first_step, "last_step_s": last_step, "series": verdicts,
            "disk_bound": {"checkpoint_bytes": checkpoint_bytes, "keep_last": keep_last,
                           "bound_bytes": bound, "max_checkpoint_folder_bytes": most,
                           "most_checkpoints_seen": max(s.checkpoints, default=0), "within": most <= bound,
                           "rule": f"checkpoint/ never holds more than (keep_last + 1) x one checkpoint + "
                                   f"{SMALL_FILES_SLACK // 1024} KiB (`latest`): a save writes the new checkpoint "
                                   f"before the oldest one is removed"}}


def ranks_together(per_rank: list[list[int | None]]) -> list[int | None]:
    """The sum over the rank processes at each sample; None where one of them was not running (start, end)."""
    return [None if None in v else sum(v) for v in per_rank]


def summarize(s: Samples) -> dict[str, Any]:
    """Start/end figures of each series (medians of the first and last 10 samples)."""
    def ends(values: list[float]) -> dict[str, float]:
        k = max(min(10, len(values) // 3), 1)
        return {"start": statistics.median(values[:k]), "end": statistics.median(values[-k:]),
                "max": max(values)} if values else {}

    together = [v for v in ranks_together(s.rss_ranks) if v is not None]
    return {"rss_ranks_bytes": ends(together),
            "rss_per_rank_bytes": [ends([v[i] for v in s.rss_ranks if len(v) > i and v[i] is not None])
                                   for i in range(len(s.rank_pids))],
            "fds_ranks": ends([v for v in ranks_together(s.fds_ranks) if v is not None]),
            "rss_workers_bytes": ends(s.rss_workers),
            "fds_workers": ends(s.fds_workers), "disk_checkpoint_bytes": ends(s.disk_checkpoint),
            "disk_run_bytes": ends(s.disk_run), "step_seconds": ends(s.step_seconds),
            "step_seconds_median": statistics.median(s.step_seconds) if s.step_seconds else None,
            "load1": ends(s.load1), "rank_processes_seen": len(s.rank_pids)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from dat_ds.core.errors import ConfigError
    from dat_ds.launch.launcher import launch

    from . import write_result
    from .common import runs_folder, show_table

    if args.epochs < 1 or args.nproc < 1 or args.interval <= 0 or not 0 <= args.warmup_share < 1:
        raise ConfigError("bench soak needs --epochs >= 1, --nproc >= 1, --interval > 0 and 0 <= --warmup-share < 1")
    if args.subset % (args.micro_batch * args.nproc):
        raise ConfigError(f"--subset {args.subset} is not a multiple of --micro-batch x --nproc "
                          f"({args.micro_batch * args.nproc}): every step record must hold one whole global batch")
    global_batch = args.micro_batch * args.nproc
    with runs_folder(args.runs_dir, False, "dat-ds-soak-") as runs:
        argv = train_argv(args, runs)
        run_dir = runs / "soak"
        load_start, t0, wall_start = loadavg(), time.monotonic(), time.strftime("%Y-%m-%d %H:%M:%S")
        sampler = Sampler(run_dir, global_batch=global_batch, interval=args.interval, t0=t0)
        sampler.start()
        try:
            launch(RANK_MODULE, argv, nproc=args.nproc, checkpoint_root=run_dir / "checkpoint")
        finally:
            sampler.stopped.set()
            sampler.join()
        seconds, load_end = time.monotonic() - t0, loadavg()
        sizes = checkpoint_sizes(run_dir / "checkpoint")
        logs = {p.name: p.stat().st_size for p in sorted(run_dir.iterdir()) if p.is_file()}
    s = sampler.samples
    checkpoint_bytes = max(sizes.values(), default=0)
    judged = analyse(s, checkpoint_bytes=checkpoint_bytes, keep_last=args.keep_last, warmup=args.warmup_share)
    steps = s.step[-1] if s.step else 0
    out = {"config": {k: getattr(args, k) for k in CONFIG_KEYS},
           "train_command": ["dat-ds", "train", "--nproc", str(args.nproc),
                             *("RUNS" if a == str(runs) else a for a in argv)],
           "global_batch": global_batch, "steps": steps, "epochs": s.epoch[-1] if s.epoch else 0,
           "steps_per_epoch": args.subset // global_batch, "started": wall_start, "seconds": seconds,
           "training_seconds": judged["last_step_s"] - judged["first_step_s"],
           "loadavg_start": load_start, "loadavg_end": load_end, "cpus": os.cpu_count(),
           "checkpoints_left": sizes, "run_files_bytes": logs,
           "metrics_jsonl_bytes_per_step": logs.get("metrics.jsonl", 0) / max(steps, 1),
           "summary": summarize(s), "rule": RULE, **judged,
           "samples": {k: v for k, v in vars(s).items()}}
    out["goal"] = ("no series grows (rss, fds, disk, step_time: the rule above) and the checkpoint folder stays "
                   "within keep_last's bound")
    out["goal_met"] = (all(v["verdict"] == "flat" for v in judged["series"].values())
                       and judged["disk_bound"]["within"])
    path = write_result(args.out, "soak", out)
    plot(out, Path(args.out) / "soak.png")
    mb = 2**20
    units = {"rss": (mb, "MB"), "fds": (1, "fds"), "disk": (mb, "MB"), "step_time": (1e-3, "ms")}
    show_table(f"bench soak: {out['epochs']} epochs, {steps} steps on {args.nproc} ranks in {seconds / 60:.1f} min "
               f"(load {load_start[0]:.1f} -> {load_end[0]:.1f} on {os.cpu_count()} CPUs)",
               ["series", "first third", "last third", "fitted change", "noise", "threshold", "verdict"],
               [[f"{name} ({units[name][1]})", *(v.get(k, float("nan")) / units[name][0] for k in
                 ("first_third_median", "last_third_median", "fitted_change", "noise", "threshold")), v["verdict"]]
                for name, v in judged["series"].items()])
    bound = judged["disk_bound"]
    log.info("checkpoint folder: at most %.1f MB, bound %.1f MB (%d + 1 checkpoints of %.1f MB): %s; wrote %s",
             bound["max_checkpoint_folder_bytes"] / mb, bound["bound_bytes"] / mb, args.keep_last,
             checkpoint_bytes / mb, "within" if bound["within"] else "EXCEEDED", path)
    return out


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dat_ds.core.io import save_figure

    s, judged = result["samples"], result["series"]
    start, end = result["warmup_ends_s"], result["last_step_s"]
    mb = 2**20
    minutes = [t / 60 for t in s["t"]]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)

    def fitted(ax, name: str, scale: float) -> None:
        v = judged[name]
        if "slope_per_s" not in v:
            return
        line = [(v["mean"] + v["slope_per_s"] * (x - v["mean_t"])) / scale for x in (start, end)]
        ax.plot([start / 60, end / 60], line,
                "k--", lw=1, label=f"fit: {v['fitted_change'] / scale:+.3g} over the window")
        ax.axvspan(0, start / 60, color="0.9", zorder=0)
        ax.set_title(f"{ax.get_title()}: {v['verdict']}")

    ax = axes[0][0]
    ranks = len(s["rank_pids"])

    def per_rank(values: list[list[int | None]], i: int, scale: float) -> list[float | None]:
        return [v[i] / scale if len(v) > i and v[i] is not None else None for v in values]

    def together(values: list[list[int | None]], scale: float) -> list[float | None]:
        return [None if v is None else v / scale for v in ranks_together(values)]

    rss = together(s["rss_ranks"], mb)
    ax.plot(minutes, rss, lw=1.5, color="C2", label=f"{ranks} rank processes together")
    judged_rss = [v for t, v in zip(s["t"], rss) if start <= t <= end and v is not None]
    if judged_rss:  # zoomed on the judged window, where a drift of a few MB must be visible (start-up climbs from 0)
        low, high = min(judged_rss), max(judged_rss)
        pad = max(0.02 * high, 1.0)
        ax.set_ylim(low - pad, high + pad)
    ax.set(title="resident memory (VmRSS), zoomed", ylabel="MB")
    fitted(ax, "rss", mb)
    ax = axes[0][1]
    for i in range(ranks):
        ax.plot(minutes, per_rank(s["fds_ranks"], i, 1), lw=1, label=f"rank process {i + 1}")
    ax.plot(minutes, together(s["fds_ranks"], 1), lw=1.5, label="ranks together")
    ax.plot(minutes, s["fds_workers"], lw=0.6, color="0.5", label="loader workers")
    ax.set(title="open file descriptors", ylabel="descriptors")
    fitted(ax, "fds", 1)
    ax = axes[1][0]
    ax.plot(minutes, [v / mb for v in s["disk_checkpoint"]], lw=1, label="checkpoint/")
    ax.plot(minutes, [v / mb for v in s["disk_run"]], lw=0.8, label="run folder")
    ax.axhline(result["disk_bound"]["bound_bytes"] / mb, color="r", ls=":",
               label=f"bound for checkpoint/: (keep_last {result['disk_bound']['keep_last']} + 1) checkpoints")
    ax.set(title="disk use", ylabel="MB", xlabel="minutes since the start")
    fitted(ax, "disk", mb)
    ax = axes[1][1]
    ax.plot([t / 60 for t in s["step_t"]], [v * 1e3 for v in s["step_seconds"]], ".", ms=1.5, alpha=0.4,
            label="step")
    ax.set(title="step time", ylabel="ms", xlabel="minutes since the start", yscale="log")
    fitted(ax, "step_time", 1e-3)
    load = ax.twinx()
    load.plot(minutes, s["load1"], color="0.6", lw=0.8, label="load (1 min)")
    load.set_ylabel("load average")
    for a in axes.flat:
        a.legend(fontsize=7, loc="upper left")
    fig.suptitle(f"bench soak: {result['epochs']} epochs, {result['steps']} steps, {result['config']['nproc']} ranks "
                 f"on {result['cpus']} CPUs (grey band: start-up + warm-up, not judged)")
    fig.tight_layout()
    save_figure(fig, path)
