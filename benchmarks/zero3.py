"""``dat-ds bench zero3``: all-gather bytes and step time per PGD-k training step, ZeRO-2 vs ZeRO-3 with and without
gathered attacks (``attack.zero3_gather``).

Arms, for each k of ``--ks`` (Madry PGD-k: one attack, one training forward and backward per step):

* ``ZeRO-2``: ``ds_configs/zero2_fp32.json``, full weights on every rank; the attack needs no collective (its one
  all-gather per step is the optimizer's: the updated partitions back to every rank);
* ``ZeRO-3``: ``ds_configs/zero3_fp32.json`` with ``attack.zero3_gather=never``, ZeRO-3 before gathered attacks:
  every attack step's forward on the engine's module all-gathers every layer again (DeepSpeed keeps a layer
  gathered from its forward to its backward here: measured k + 1 times the parameter bytes per step);
* ``ZeRO-3 gathered``: ``attack.zero3_gather=always``: the weights gathered once per step into a copy the attack
  runs on, then the training forward and backward gather them once more: 2 times the parameter bytes, whatever k.

The model is an MLP (``--width``) registered here as a plugin: many weights and few multiply-adds per weight, so
communication matters on CPU ranks as it does for large models on GPUs. All arms are built in one launch of
``--nproc`` ranks (gloo on CPU) from the same seed and stepped round-robin, one step each per round, so load
drifts hit all arms alike. A step is ``train_one_epoch`` on one batch (the trainer's loop: the objective,
``engine.backward``, ``engine.step``); its time runs from a barrier to a barrier. All-gather bytes are the
gathered output sizes of every all-gather call on rank 0 (``deepspeed.comm``'s backend and ``torch.distributed``,
counted once when one calls the other), over the measured steps. ``/proc/loadavg`` is recorded before and after:
on a shared machine the times are noisy; the bytes are exact.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from dat_ds.launch.entry import run_entry
from dat_ds.launch.launcher import launch

from . import CHECKOUT, checkout_env, write_result
from .common import show_table

MODEL = "zero3_bench_mlp"  # registered in the ranks (``_register_model``)
ARMS = (("ZeRO-2", 2, False), ("ZeRO-3", 3, False), ("ZeRO-3 gathered", 3, True))  # label, stage, gathered
GOAL_BYTES = 3.0  # gathered ZeRO-3 at the largest k: all-gather bytes per step <= 3 x the parameter bytes
GOAL_TIME = 1.25  # ... and step time <= 1.25 x ZeRO-2's


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nproc", type=int, default=2, help="ranks (default 2)")
    p.add_argument("--ks", default="1,5,10", help="PGD step counts (default 1,5,10)")
    p.add_argument("--steps", type=int, default=6, help="measured steps per arm (default 6)")
    p.add_argument("--warmup", type=int, default=2, help="steps per arm before measuring (default 2)")
    p.add_argument("--micro", type=int, default=32, help="per-rank batch (default 32)")
    p.add_argument("--width", type=int, default=1024,
                   help="hidden width of the MLP (default 1024: 2.9M parameters, 11.6 MB in fp32)")


def _register_model(width: int) -> None:
    """The bench's MLP under ``MODEL`` (a plugin name: ``benchmarks`` is outside ``dat_ds``)."""
    from torch import nn

    from dat_ds.models import MODELS

    if MODEL in MODELS.names():
        return

    @MODELS.register(MODEL)
    def build(in_chans: int, num_classes: int, img_size: int) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(in_chans * img_size * img_size, width), nn.ReLU(),
                             nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                             nn.Linear(width, num_classes))


class AllGatherBytes:
    """Bytes gathered by every all-gather on this rank: ``deepspeed.comm``'s backend (whose torch functions it looked
    up once, at start-up) and ``torch.distributed``, the outermost call counted once."""

    TORCH = ("all_gather", "all_gather_into_tensor", "_all_gather_base")
    DEEPSPEED = ("all_gather", "all_gather_into_tensor", "all_gather_base", "all_gather_coalesced")

    def __init__(self):
        self.bytes = 0
        self.calls = 0
        self._depth = 0
        self._undo: list[Callable[[], None]] = []

    @staticmethod
    def _nbytes(args: tuple, kwargs: dict) -> int:
        out = kwargs.get("output_tensor", kwargs.get("tensor_list", kwargs.get("output_tensors")))
        if out is None:
            out = args[0]
        tensors = out if isinstance(out, (list, tuple)) else [out]
        return sum(t.numel() * t.element_size() for t in tensors)

    def _wrap(self, owner: Any, name: str) -> None:
        inner = getattr(owner, name, None)
        if inner is None:
            return

        def counted(*args, **kwargs):
            if self._depth == 0:
                self.bytes += self._nbytes(args, kwargs)
                self.calls += 1
            self._depth += 1
            try:
                return inner(*args, **kwargs)
            finally:
                self._depth -= 1

        had = name in vars(owner)
        setattr(owner, name, counted)
        self._undo.append(lambda: setattr(owner, name, inner) if had else delattr(owner, name))

    def install(self) -> AllGatherBytes:
        import torch.distributed as tdist
        from deepspeed.comm import comm as ds_comm

        for name in self.TORCH:
            self._wrap(tdist, name)
        if ds_comm.cdb is not None:
            for name in self.DEEPSPEED:
                self._wrap(ds_comm.cdb, name)
        return self

    def uninstall(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo = []


class _Arm:
    """One (stage, gathered, k) arm: its run built by ``build_run`` (the trainer's), its batches and measurements."""

    def __init__(self, label: str, stage: int, gathered: bool, k: int, args, folder: Path):
        from dat_ds.core import dist
        from dat_ds.core.config import build_config, check_engine
        from dat_ds.runtime import ds_adapter, ds_config
        from dat_ds.runtime.build import build_run
        from dat_ds.runtime.loop import TrainState

        self.label, self.stage, self.gathered, self.k = label, stage, gathered, k
        ds = folder / f"zero{stage}_fp32.json"
        if dist.is_main_process():  # the shipped JSON at this batch
            shipped = json.loads((CHECKOUT / "ds_configs" / ds.name).read_text())
            shipped.pop("train_batch_size", None)
            ds.write_text(json.dumps({**shipped, "train_micro_batch_size_per_gpu": args.micro,
                                      "gradient_accumulation_steps": 1}))
        dist.barrier()
        total = args.warmup + args.steps
        self.cfg = build_config(None, [f"model.name={MODEL}", "objective.name=madry", f"attack.steps={k}",
                                       f"attack.zero3_gather={'always' if gathered else 'never'}",
                                       f"train.log_every={10 ** 6}", f"output_dir={folder}", f"deepspeed_config={ds}",
                                       f"data.train_subset={total * args.micro * dist.world_size()}"])
        check_engine(self.cfg, stage)
        self.run = build_run(self.cfg, ds_config.prepare_run(self.cfg, dist.world_size()))
        self.batches = iter(self.run.loaders.loader(0))
        self.state = TrainState()
        self.param_bytes = sum(ds_adapter.full_numel(p) * p.element_size() for p in self.run.engine.module.parameters())
        self.times: list[float] = []
        self.gathered_bytes: list[int] = []

    def step(self, counter: AllGatherBytes, measure: bool) -> None:
        import torch.distributed as tdist

        from dat_ds.runtime.loop import train_one_epoch

        batch = next(self.batches)
        tdist.barrier()
        before = counter.bytes
        t0 = time.perf_counter()
        train_one_epoch(self.run.engine, self.run.objective, self.run.ctx, [batch], self.state, cfg=self.cfg)
        tdist.barrier()
        if measure:
            self.times.append(time.perf_counter() - t0)
            self.gathered_bytes.append(counter.bytes - before)

    def row(self) -> dict[str, Any]:
        per_step = statistics.mean(self.gathered_bytes)
        return {"arm": self.label, "zero_stage": self.stage, "gathered": self.gathered, "steps": self.k,
                "allgather_bytes_per_step": per_step, "param_bytes": self.param_bytes,
                "allgather_over_param_bytes": per_step / self.param_bytes,
                "step_seconds": statistics.median(self.times), "step_seconds_min": min(self.times),
                "measured_steps": len(self.times)}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="bench zero3 on every rank (started by launch())")
    p.add_argument("--result", required=True, help="JSON file rank 0 writes")
    add_args(p)
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the DeepSpeed launcher
    return p


def main(args: argparse.Namespace) -> int:
    """Rank entry: every arm on this rank, round-robin; rank 0 writes ``--result``."""
    import logging

    from dat_ds.core import dist
    from dat_ds.core.io import atomic_write_json

    dist.setup_logging(logging.WARNING)
    dist.init_distributed()
    threads = dist.set_threads_per_rank()
    _register_model(args.width)
    ks = [int(k) for k in args.ks.split(",")]
    with tempfile.TemporaryDirectory(prefix="dat-ds-zero3-") as tmp:
        folder = Path(dist.all_gather_object(tmp)[0])  # rank 0's folder: one host
        arms = [_Arm(label, stage, gathered, k, args, folder) for k in ks for label, stage, gathered in ARMS]
        counter = AllGatherBytes().install()
        try:
            for i in range(args.warmup + args.steps):
                for arm in arms:
                    arm.step(counter, measure=i >= args.warmup)
        finally:
            counter.uninstall()
        dist.barrier()
    if dist.is_main_process():
        atomic_write_json(args.result, {"backend": dist.accelerator().communication_backend_name(),
                                        "threads_per_rank": threads, "results": [a.row() for a in arms]})
    dist.barrier()
    return 0


def _loadavg() -> str | None:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return None


def _goals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """At the largest k: gathered ZeRO-3's bytes per step against the parameter bytes, its time against ZeRO-2's
    (``time.by_steps``: that ratio at every k)."""
    by = {(r["zero_stage"], r["gathered"], r["steps"]): r for r in rows}
    ks = sorted({r["steps"] for r in rows})
    ratios = {k: by[(3, True, k)]["step_seconds"] / by[(2, False, k)]["step_seconds"] for k in ks}
    k = ks[-1]
    bytes_ratio = by[(3, True, k)]["allgather_over_param_bytes"]
    return {"steps": k,
            "bytes": {"max_over_param_bytes": GOAL_BYTES, "measured": bytes_ratio, "met": bytes_ratio <= GOAL_BYTES},
            "time": {"max_over_zero2": GOAL_TIME, "measured": ratios[k], "met": ratios[k] <= GOAL_TIME,
                     "by_steps": {str(k): r for k, r in ratios.items()}}}


def _plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dat_ds.core.io import save_figure

    ks = sorted({r["steps"] for r in rows})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.9))
    colors = {"ZeRO-2": "#7f7f7f", "ZeRO-3": "#ed7d31", "ZeRO-3 gathered": "#4472c4"}
    for label, _, _ in ARMS:
        mine = sorted((r for r in rows if r["arm"] == label), key=lambda r: r["steps"])
        ax1.plot(ks, [r["allgather_over_param_bytes"] for r in mine], "o-", color=colors[label], label=label)
        ax2.plot(ks, [r["step_seconds"] for r in mine], "o-", color=colors[label], label=label)
    ax1.axhline(GOAL_BYTES, color="#c00000", ls="--", lw=1, label=f"goal: <= {GOAL_BYTES:g}x (gathered)")
    ax1.set(xlabel="PGD steps k", ylabel="all-gather bytes per step / parameter bytes", xticks=ks,
            title="all-gathered per training step")
    ax2.set(xlabel="PGD steps k", ylabel="seconds per step (median)", xticks=ks, title="step time (noisy: shared CPU)")
    for ax in (ax1, ax2):
        ax.legend(fontsize=8)
        ax.set_ylim(bottom=0)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from dat_ds.core.errors import ConfigError

    if args.nproc < 2:
        raise ConfigError(f"bench zero3 needs --nproc >= 2 (got {args.nproc}); with one rank nothing is gathered")
    if args.steps < 1 or args.warmup < 0 or args.micro < 1 or args.width < 1:
        raise ConfigError("bench zero3 needs --steps >= 1, --warmup >= 0, --micro >= 1 and --width >= 1")
    try:
        ks = [int(k) for k in args.ks.split(",")]
    except ValueError:
        raise ConfigError(f"--ks {args.ks!r} must be comma-separated step counts, e.g. 1,5,10") from None
    if not ks or min(ks) < 1:
        raise ConfigError(f"--ks {args.ks!r} must be step counts >= 1")
    load_before = _loadavg()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dat-ds-bench-") as tmp:
        out_file = Path(tmp) / "zero3.json"
        launch("benchmarks.zero3", ["--result", str(out_file), "--ks", args.ks, "--steps", str(args.steps),
                                    "--warmup", str(args.warmup), "--micro", str(args.micro),
                                    "--width", str(args.width)],
               nproc=args.nproc, env=checkout_env({"DAT_DS_THREADS_PER_RANK": "1"}))
        measured = json.loads(out_file.read_text())
    rows = measured["results"]
    goals = _goals(rows)
    result = {"nproc": args.nproc, "backend": measured["backend"], "threads_per_rank": measured["threads_per_rank"],
              "model": f"MLP 784-{args.width}-{args.width}-{args.width}-10 (fp32)", "objective": "madry",
              "micro_batch": args.micro, "warmup_steps": args.warmup, "measured_steps": args.steps,
              "loadavg_before": load_before, "loadavg_after": _loadavg(),
              "note": "step times come from a CPU shared with other work (see loadavg): noisy; bytes are exact",
              "seconds": time.perf_counter() - t0, "results": rows, "goals": goals,
              "goal_met": goals["bytes"]["met"] and goals["time"]["met"]}
    out = Path(args.out)
    write_result(out, "zero3", result)
    title = (f"{args.nproc} ranks, {measured['backend']}, MLP width {args.width} "
             f"({rows[0]['param_bytes'] / 1e6:.1f} MB of weights), Madry PGD-k, batch {args.micro}/rank")
    _plot(rows, out / "zero3.png", title)
    zero2 = {r["steps"]: r["step_seconds"] for r in rows if r["zero_stage"] == 2}
    show_table(f"bench zero3: {title}", ["arm", "k", "all-gather MB/step", "x param bytes", "s/step", "vs ZeRO-2"],
               [[r["arm"], r["steps"], r["allgather_bytes_per_step"] / 1e6, f"{r['allgather_over_param_bytes']:.2f}x",
                 r["step_seconds"], f"{r['step_seconds'] / zero2[r['steps']]:.2f}x"] for r in rows])
    return result


if __name__ == "__main__":
    sys.exit(run_entry(lambda: main(get_args_parser().parse_args())))
