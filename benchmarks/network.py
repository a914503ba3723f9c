"""``dat-ds bench network``: compressed communication where it pays -- two "nodes" behind a slow link.

Two network namespaces joined by a veth pair (``benchmarks/netns.py``) stand in for two machines; ``tc tbf``
shapes the link (default sweep: unshaped, 1000 and 100 Mbit/s). One rank runs in each namespace, each
started by its own ``launch()`` as DeepSpeed node 0 / node 1 (``--no_ssh``, master address on the link,
gloo bound to the veth), so every byte between the ranks crosses the shaped link.

For each model and bandwidth, one launch runs every optimizer as a short DAT training run on the
embedded data (the same initial weights, data and attack for each): ``--warmup`` fp32 steps (1-bit Adam
and 1-bit LAMB ``freeze_step``, 0/1 Adam ``var_freeze_step``), then ``--steps`` compression-stage
steps. Per optimizer: median step time per stage, bytes per step and the whole run's time to a
training loss (the fp32 run's smoothed loss at 3/4 of its steps: fixed before the others are compared).

``speedup`` = fp32 all-reduce median step time / the optimizer's compression-stage median step time;
``run_speedup`` = fp32's time to the target loss / the optimizer's, warm-up included (None when it did
not reach the target). Results: ``<out>/network.json`` (a list ``results``), ``<out>/network.png``, a table.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from dat_ds.launch.entry import run_entry
from dat_ds.launch.launcher import NodeLaunch, launch

from . import checkout_env, netns, write_result
from .comm import ARMS
from .common import show_table

log = logging.getLogger(__name__)

FP32 = "fp32 all-reduce"
OPTIMIZERS = {  # --optimizers name -> the label of bench comm's arm (its ds_config and warm-up keys)
    "fp32": FP32, "dat8": "DAT 8-bit", "onebit_adam": "1-bit Adam", "zero_one_adam": "0/1 Adam",
    "onebit_lamb": "1-bit LAMB",
}
DEFAULT_BANDWIDTHS = "none,1000,100"
TARGET_FRACTION = 0.75  # the target loss: fp32's smoothed loss after this fraction of its steps
GOAL = {"model": "resnet18", "bandwidth_mbit": 100.0, "optimizer": "1-bit Adam", "speedup": 3.0, "run_speedup": 2.0}


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", default="small_cnn,resnet18", help="comma-separated model names (default small_cnn,resnet18)")
    p.add_argument("--bandwidths", default=DEFAULT_BANDWIDTHS,
                   help=f"Mbit/s per link, 'none' = unshaped (default {DEFAULT_BANDWIDTHS})")
    p.add_argument("--optimizers", default=",".join(OPTIMIZERS), help=f"any of {', '.join(OPTIMIZERS)} (default all)")
    p.add_argument("--steps", type=int, default=10, help="compression-stage steps per optimizer (default 10)")
    p.add_argument("--warmup", type=int, default=5, help="fp32 warm-up steps of the 1-bit optimizers (default 5)")
    # Small on purpose: on a CPU one ResNet-18 step of 32 images costs seconds of compute, which no link
    # speed changes; a GPU does that work in milliseconds, where the link's share is what it is here at 16.
    p.add_argument("--micro", type=int, default=16, help="micro batch per rank (default 16)")
    p.add_argument("--attack-steps", type=int, default=1, help="PGD steps of the DAT objective (default 1)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds one model x bandwidth may take (default 900)")


# ---------------------------------------------------------------------------------------------- ranks
def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="bench network on every rank (started by launch(), one per node)")
    p.add_argument("--result", required=True, help="JSON file rank 0 writes")
    p.add_argument("--model", required=True)
    p.add_argument("--optimizers", required=True, help="comma-separated labels of bench comm's arms")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--warmup", type=int, required=True)
    p.add_argument("--micro", type=int, required=True)
    p.add_argument("--attack-steps", type=int, required=True)
    p.add_argument("--deadline", type=float, required=True, help="time.time() by which the ranks give up")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the DeepSpeed launcher
    return p


def _arm_config(label: str, args: argparse.Namespace, world: int):
    """The run config (DAT-PGD-k on ``--model``, one epoch of warm-up + timed steps) and the engine settings of
    optimizer ``label``'s JSON at ``--micro`` per rank, its compression starting after ``--warmup`` steps."""
    from dat_ds.core.config import build_config
    from dat_ds.runtime import ds_config

    file, warmup_keys = ARMS[label]
    total = args.warmup + args.steps
    cfg = build_config(None, [f"model.name={args.model}", f"attack.steps={args.attack_steps}", "objective.name=dat",
                              "train.epochs=1", f"train.max_steps_per_epoch={total}", f"train.log_every={10**6}",
                              f"deepspeed_config={file}"])
    raw = ds_config.load_ds_json(cfg.deepspeed_config)
    for k in warmup_keys:
        raw["optimizer"]["params"][k] = args.warmup
    raw.pop("train_batch_size", None)
    raw["train_micro_batch_size_per_gpu"] = args.micro
    raw["gradient_accumulation_steps"] = 1
    return cfg, ds_config.prepare(cfg.deepspeed_config, world, data=raw)


def _step_bytes(comm, numel: int, world: int) -> tuple[str, float, float]:
    """(stage, bytes this rank sent, fp32 all-reduce's bytes) of the step just taken."""
    from dat_ds.comm import fp32_allreduce_bytes

    if comm is None:
        sent = fp32_allreduce_bytes(numel, world)
        return "fp32", sent, sent
    stats = comm.comm_stats()
    return stats["stage"], stats["step_bytes_sent"], stats["step_bytes_fp32_equiv"]


def _timed_steps(label: str, args: argparse.Namespace, engine, comm, objective, ctx, loader, *, numel: int,
                 total: int) -> list[dict[str, Any]]:
    """``total`` training steps, each timed with the device synchronised: seconds, loss, stage, bytes."""
    from dat_ds.core import dist

    device, world = dist.device(), dist.world_size()
    steps: list[dict[str, Any]] = []
    engine.train()
    dist.barrier()
    prev = time.perf_counter()
    for i, batch in enumerate(loader):
        if i >= total:
            break
        if time.time() > args.deadline:
            raise TimeoutError(f"bench network: {label} on {args.model} passed its deadline after {i} steps")
        x, y = batch[0].to(device), batch[1].to(device)
        ctx.step = i
        out = objective(ctx, x, y)
        engine.backward(out.loss)
        objective.after_backward()
        engine.step()
        loss = float(out.loss.detach())  # a host sync per step: fine here, this measures whole steps
        dist.accelerator().synchronize()
        now = time.perf_counter()
        stage, sent, fp32 = _step_bytes(comm, numel, world)
        steps.append({"seconds": now - prev, "loss": loss, "stage": stage, "bytes": sent, "fp32_bytes": fp32})
        prev = now
    return steps


def _run_arm(label: str, args: argparse.Namespace, train_set, spec) -> dict[str, Any]:
    """One short training run with optimizer ``label`` on this rank: per-step seconds, loss, stage, bytes."""
    import gc

    import torch

    from dat_ds.core import dist
    from dat_ds.data.loaders import build_train_loader
    from dat_ds.models import create_model
    from dat_ds.objectives import ObjectiveContext, build_objective
    from dat_ds.runtime.build import build_engine

    rank, world = dist.rank(), dist.world_size()
    total = args.warmup + args.steps
    cfg, settings = _arm_config(label, args, world)
    torch.manual_seed(cfg.seed)  # the same initial weights for every optimizer
    model = create_model(cfg.model.name, spec)
    numel = sum(p.numel() for p in model.parameters() if p.requires_grad)
    loaders = build_train_loader(cfg, train_set, micro_batch=args.micro, rank=rank, world_size=world)
    built = build_engine(cfg, settings, model, total)
    engine, comm = built.engine, built.comm
    objective = build_objective(cfg)
    ctx = ObjectiveContext(model=engine, module=engine.module, cfg=cfg,
                           generator=torch.Generator(device=dist.device()).manual_seed(1 + rank))
    steps = _timed_steps(label, args, engine, comm, objective, ctx, loaders.loader(0), numel=numel, total=total)
    local_steps = comm.comm_stats().get("local_steps", 0) if comm is not None else 0
    del engine, built, comm, ctx, model
    gc.collect()
    return {"numel": numel, "steps": steps, "local_steps": local_steps}


def main(args: argparse.Namespace) -> int:
    """Rank entry: every optimizer in turn; rank 0 writes ``--result`` with every rank's step records."""
    from dat_ds.core import dist
    from dat_ds.core.config import DataConfig
    from dat_ds.core.io import atomic_write_json
    from dat_ds.data import build_dataset

    dist.setup_logging()
    dist.init_distributed()
    threads = dist.set_threads_per_rank()
    train_set, spec = build_dataset(DataConfig(), "train")
    arms = {}
    for label in args.optimizers.split(","):
        arms[label] = _run_arm(label, args, train_set, spec)
    every_rank = dist.all_gather_object(arms)
    if dist.is_main_process():
        atomic_write_json(args.result, {"backend": dist.accelerator().communication_backend_name(),
                                        "world_size": dist.world_size(), "threads_per_rank": threads,
                                        "ranks": every_rank})
    dist.barrier()
    return 0


# ------------------------------------------------------------------------------------- the benchmark
def _parse_bandwidths(text: str) -> list[float | None]:
    from dat_ds.core.errors import ConfigError

    out: list[float | None] = []
    for item in text.split(","):
        item = item.strip().lower()
        if item in ("none", "unshaped", "0", ""):
            out.append(None)
            continue
        try:
            value = float(item)
        except ValueError:
            raise ConfigError(f"--bandwidths: {item!r} is not a number of Mbit/s or 'none'") from None
        if not 0.1 <= value <= 100_000:
            raise ConfigError(f"--bandwidths: {value:g} Mbit/s is outside 0.1 .. 100000")
        out.append(value)
    return out


def _parse_optimizers(text: str) -> list[str]:
    from dat_ds.core.errors import ConfigError

    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in OPTIMIZERS]
    if bad or not names:
        raise ConfigError(f"--optimizers: unknown {', '.join(bad) or '(none)'}; choose from {', '.join(OPTIMIZERS)}")
    labels = [OPTIMIZERS[n] for n in names]
    return labels if FP32 in labels else [FP32, *labels]  # every speedup is relative to fp32, measured alongside


def _launch_pair(link: netns.NetnsLink, argv: list[str], timeout_s: float) -> None:
    """Node 0 and node 1 of one run, each through ``launch()`` inside its namespace; raises if either failed."""
    from dat_ds.core.ports import free_port

    with tempfile.TemporaryDirectory(prefix="dat-ds-netbench-") as tmp:
        hostfile = Path(tmp) / "hostfile"
        hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
        port = free_port()  # any port: the master listens on the link, inside an otherwise empty namespace
        errors: list[BaseException | None] = [None, None]

        def node(i: int) -> None:
            env = checkout_env({"GLOO_SOCKET_IFNAME": link.ifnames[i], "NCCL_SOCKET_IFNAME": link.ifnames[i],
                                "DAT_DS_THREADS_PER_RANK": "1"})
            try:
                launch("benchmarks.network", argv, nproc=1, hostfile=str(hostfile), master_port=port, env=env,
                       node=NodeLaunch(i, link.addrs[0], link.exec_prefix(i)))
            except BaseException as e:  # noqa: BLE001 - reported by the caller's thread
                errors[i] = e

        threads = [threading.Thread(target=node, args=(i,), daemon=True) for i in (0, 1)]
        for t in threads:
            t.start()
        # The ranks give up at the deadline (and any collective after 120 s); this bound is only a backstop.
        deadline = time.monotonic() + timeout_s + 180
        for t in threads:
            t.join(timeout=max(1.0, deadline - time.monotonic()))
        if any(t.is_alive() for t in threads):
            raise TimeoutError(f"bench network: a node did not finish within {timeout_s + 180:.0f} s")
        for e in errors:
            if e is not None:
                raise e


def _median_ms(steps: list[dict[str, Any]], stage: str | tuple[str, ...]) -> float | None:
    stages = (stage,) if isinstance(stage, str) else stage
    times = [s["seconds"] for s in steps if s["stage"] in stages]
    return 1000 * statistics.median(times) if times else None


def _smoothed(values: list[float], window: int) -> list[float]:
    return [statistics.fmean(values[max(0, i + 1 - window):i + 1]) for i in range(len(values))]


def summarise(measured: dict[str, Any], *, model: str, bandwidth: float | None, link_mb_s: float | None) -> list[dict[str, Any]]:
    """One result object per optimizer from the ranks' step records (step time = the slower rank's)."""
    ranks = measured["ranks"]
    labels = list(ranks[0])
    per_arm: dict[str, dict[str, Any]] = {}
    for label in labels:
        steps0 = ranks[0][label]["steps"]
        steps = []
        for i, s in enumerate(steps0):  # the step took as long as its slower rank; the loss is the ranks' mean
            seconds = max(r[label]["steps"][i]["seconds"] for r in ranks)
            loss = statistics.fmean(r[label]["steps"][i]["loss"] for r in ranks)
            steps.append({**s, "seconds": seconds, "loss": loss})
        per_arm[label] = {"steps": steps, "numel": ranks[0][label]["numel"], "local_steps": ranks[0][label]["local_steps"]}
    window = max(2, len(per_arm[FP32]["steps"]) // 5)
    fp32_steps = per_arm[FP32]["steps"]
    target_at = max(0, int(round(TARGET_FRACTION * len(fp32_steps))) - 1)
    target = _smoothed([s["loss"] for s in fp32_steps], window)[target_at]
    fp32_ms = _median_ms(fp32_steps, "fp32")

    def time_to_target(steps) -> float | None:
        elapsed = 0.0
        for s, smooth in zip(steps, _smoothed([s["loss"] for s in steps], window)):
            elapsed += s["seconds"]
            if smooth <= target:
                return elapsed
        return None

    fp32_ttt = time_to_target(fp32_steps)
    fp32_run_s = sum(s["seconds"] for s in fp32_steps)
    rows = []
    for label, arm in per_arm.items():
        steps = arm["steps"]
        compressed = ("compressed",) if label != FP32 else ("fp32",)
        ms_c = _median_ms(steps, compressed)
        comp_steps = [s for s in steps if s["stage"] in compressed]
        ttt = time_to_target(steps)
        run_s = sum(s["seconds"] for s in steps)
        rows.append({
            "model": model, "numel": arm["numel"], "bandwidth_mbit": bandwidth, "link_mb_s": link_mb_s,
            "optimizer": label, "ms_per_step_fp32": fp32_ms,
            "ms_per_step_warmup": _median_ms(steps, "warmup"), "ms_per_step_compressed": ms_c,
            "speedup": (fp32_ms / ms_c) if fp32_ms and ms_c else None,
            "bytes_per_step_compressed": (statistics.fmean(s["bytes"] for s in comp_steps) if comp_steps else None),
            "bytes_per_step_fp32": statistics.fmean(s["fp32_bytes"] for s in steps),
            "warmup_steps": sum(s["stage"] == "warmup" for s in steps), "compressed_steps": len(comp_steps),
            "local_steps": arm["local_steps"], "run_seconds": run_s, "run_wall_speedup": fp32_run_s / run_s,
            "target_loss": target, "time_to_target_s": ttt, "final_loss": steps[-1]["loss"],
            "run_speedup": (fp32_ttt / ttt) if (fp32_ttt is not None and ttt) else None,
            "losses": [s["loss"] for s in steps], "step_seconds": [s["seconds"] for s in steps],
            "stages": [s["stage"] for s in steps],
        })
    return rows


def _plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dat_ds.core.io import save_figure

    models = list(dict.fromkeys(r["model"] for r in results))
    fig, axes = plt.subplots(1, len(models), figsize=(5.2 * len(models), 3.8), squeeze=False)
    for ax, model in zip(axes[0], models):
        rows = [r for r in results if r["model"] == model]
        shaped = sorted({r["bandwidth_mbit"] for r in rows if r["bandwidth_mbit"] is not None})
        unshaped_x = (max(shaped) * 10) if shaped else 10_000.0  # drawn to the right of the fastest shaped link
        for label in dict.fromkeys(r["optimizer"] for r in rows):
            pts = sorted(((r["bandwidth_mbit"] or unshaped_x), r["ms_per_step_compressed"]) for r in rows
                         if r["optimizer"] == label and r["ms_per_step_compressed"] is not None)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label, color="#7f7f7f" if label == FP32 else None)
        ticks = [*shaped, unshaped_x]
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(ticks, [f"{t:g}" for t in shaped] + ["unshaped"])
        ax.set(xlabel="link bandwidth (Mbit/s)", ylabel="ms per step (compression stage, median)",
               title=f"{model} ({rows[0]['numel'] / 1e6:.2f} M params), 2 nodes")
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from dat_ds.core import ui
    from dat_ds.core.errors import ConfigError

    bandwidths = _parse_bandwidths(args.bandwidths)
    labels = _parse_optimizers(args.optimizers)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if args.steps < 2 or args.warmup < 1 or args.micro < 1:
        raise ConfigError("bench network needs --steps >= 2, --warmup >= 1 and --micro >= 1")
    reason = netns.unavailable()
    if reason is not None:
        ui.show(f"bench network skipped: {reason}")
        return {"skipped": reason}
    netns.remove_leftovers()
    t0 = time.perf_counter()
    results: list[dict[str, Any]] = []
    link_speeds: dict[str, float] = {}
    link = netns.NetnsLink()
    try:
        link.open()
        for bandwidth in bandwidths:
            link.shape(bandwidth)
            mb_s = link.throughput_mb_s(nbytes=(4 << 20) if bandwidth and bandwidth < 500 else (32 << 20))
            link_speeds[str(bandwidth)] = mb_s
            log.info("link %s: measured %.1f MB/s", f"{bandwidth:g} Mbit/s" if bandwidth else "unshaped", mb_s)
            for model in models:
                with tempfile.TemporaryDirectory(prefix="dat-ds-netbench-") as tmp:
                    out_file = Path(tmp) / "network.json"
                    argv = ["--result", str(out_file), "--model", model, "--optimizers", ",".join(labels),
                            "--steps", str(args.steps), "--warmup", str(args.warmup), "--micro", str(args.micro),
                            "--attack-steps", str(args.attack_steps), "--deadline", str(time.time() + args.timeout)]
                    _launch_pair(link, argv, args.timeout)
                    measured = json.loads(out_file.read_text())
                results += summarise(measured, model=model, bandwidth=bandwidth, link_mb_s=mb_s)
    finally:
        link.close()
    goal_rows = [r for r in results if all(r[k] == GOAL[k] for k in ("model", "bandwidth_mbit", "optimizer"))]
    goal = None
    if goal_rows:
        g = goal_rows[0]
        goal = {**GOAL, "measured_speedup": g["speedup"], "measured_run_speedup": g["run_speedup"],
                "met": bool(g["speedup"] and g["speedup"] >= GOAL["speedup"] and g["run_speedup"]
                            and g["run_speedup"] >= GOAL["run_speedup"])}
    result = {"models": models, "bandwidths_mbit": bandwidths, "optimizers": labels, "steps": args.steps,
              "warmup_steps": args.warmup, "micro_batch": args.micro, "attack_steps": args.attack_steps,
              "link_mb_s": link_speeds, "seconds": time.perf_counter() - t0, "goal": goal, "results": results}
    out = Path(args.out)
    write_result(out, "network", result)
    _plot(results, out / "network.png")
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    show_table("bench network: 2 nodes (network namespaces), 1 rank each",
               ["model", "link", "optimizer", "warm-up ms", "compr. ms", "speedup", "bytes/step", "to loss s",
                "run speedup"],
               [[r["model"], "unshaped" if r["bandwidth_mbit"] is None else f"{r['bandwidth_mbit']:g} Mbit/s",
                 r["optimizer"], fmt(r["ms_per_step_warmup"], ".0f"), fmt(r["ms_per_step_compressed"], ".0f"),
                 fmt(r["speedup"], ".2f"), fmt(r["bytes_per_step_compressed"], ",.0f"),
                 fmt(r["time_to_target_s"], ".1f"), fmt(r["run_speedup"], ".2f")] for r in results])
    return result


if __name__ == "__main__":
    sys.exit(run_entry(lambda: main(get_args_parser().parse_args())))
