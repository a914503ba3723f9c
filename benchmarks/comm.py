"""``dat-ds bench comm``: bytes and wall time per optimizer step for each way of averaging gradients.

Arms (each an optimizer step on a model-sized set of parameters with random per-rank gradients,
``--nproc`` ranks started by ``launch()``, on the accelerator's device and backend, one thread per rank):

* ``fp32 all-reduce``: AdamW after an fp32 all-reduce of the gradients (what DeepSpeed does);
* ``DAT 8-bit``: AdamW after DAT's quantized all-reduce (``ds_configs/dat_8bit.json``);
* ``1-bit Adam``, ``0/1 Adam``, ``1-bit LAMB``: our compressing optimizers from their ds_configs, with
  the warm-up shortened to ``--warmup`` steps; only compression-stage steps are measured.

Bytes are what rank 0 put on the wire (deterministic); times are medians over the measured steps with
a barrier before each step, the arms stepped round-robin (noisy on shared machines: compare arms of
one run, not runs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dat_ds.launch.entry import run_entry
from dat_ds.launch.launcher import launch

from . import CHECKOUT, checkout_env, write_result
from .common import show_table

if TYPE_CHECKING:
    import torch

REPO = CHECKOUT
ARMS = {  # label -> (ds_configs file, warm-up keys to shorten)
    "fp32 all-reduce": ("zero0_fp32.json", ()),
    "DAT 8-bit": ("dat_8bit.json", ()),
    "1-bit Adam": ("onebit_adam.json", ("freeze_step",)),
    "0/1 Adam": ("zero_one_adam.json", ("var_freeze_step",)),
    "1-bit LAMB": ("onebit_lamb.json", ("freeze_step",)),
}
GOALS = {"DAT 8-bit": 3.9, "1-bit Adam": 20.0, "0/1 Adam": 20.0, "1-bit LAMB": 20.0}  # min fp32/compressed bytes


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nproc", type=int, default=2, help="ranks (default 2)")
    p.add_argument("--steps", type=int, default=30, help="measured steps per arm (default 30)")
    p.add_argument("--warmup", type=int, default=5, help="uncompressed warm-up steps before measuring (default 5)")
    p.add_argument("--model", default="small_cnn", help="parameter shapes to communicate (default small_cnn)")


def _params(model_name: str) -> list[torch.nn.Parameter]:
    """The model's parameters on this rank's device: NCCL only all-reduces accelerator tensors."""
    import torch

    from dat_ds.core import dist
    from dat_ds.data.base import DataSpec
    from dat_ds.models import create_model

    spec = DataSpec(in_chans=1, num_classes=10, img_size=28, mean=(0.5,), std=(0.5,))
    torch.manual_seed(0)
    model = create_model(model_name, spec).to(dist.device())
    return [p for p in model.parameters() if p.requires_grad]


def _arm_optimizer(label: str, params, warmup: int):
    from dat_ds.comm import QuantizedAllReduceOptimizer
    from dat_ds.optim import build_optimizer
    from dat_ds.runtime import ds_config

    file, keys = ARMS[label]
    data = json.loads((REPO / "ds_configs" / file).read_text())
    for k in keys:
        data["optimizer"]["params"][k] = warmup
    settings = ds_config.prepare(file, 1, data=data)
    opt = build_optimizer(settings.optimizer, params)
    if settings.gradient_compression is not None:
        gc = settings.gradient_compression
        opt = QuantizedAllReduceOptimizer(opt, bits=gc["bits"], block=gc["block"])
    return opt, settings.compresses or settings.gradient_compression is not None


class _Arm:
    """One arm's parameters, optimizer and measurements."""

    def __init__(self, label: str, args, rank: int):
        import torch

        from dat_ds.core import dist

        self.label = label
        self.params = _params(args.model)
        self.numel = sum(p.numel() for p in self.params)
        self.opt, self.compresses = _arm_optimizer(label, self.params, args.warmup)
        self.device = dist.device()
        self.generator = torch.Generator(device=self.device).manual_seed(1234 + rank)
        self.times: list[float] = []
        self.sent: list[int] = []
        self.fp32: list[int] = []

    def step(self, world: int, measure: bool) -> None:
        import torch
        import torch.distributed as tdist

        from dat_ds.comm import fp32_allreduce_bytes
        from dat_ds.core import dist

        for p in self.params:
            p.grad = torch.randn(p.shape, generator=self.generator, device=self.device) * 1e-2
        tdist.barrier()
        t0 = time.perf_counter()
        if not self.compresses:  # the uncompressed baseline: DeepSpeed's fp32 gradient all-reduce, then AdamW
            flat = torch.cat([p.grad.reshape(-1) for p in self.params])
            tdist.all_reduce(flat)
            flat /= world
            for p, chunk in zip(self.params, torch.split(flat, [p.numel() for p in self.params])):
                p.grad.copy_(chunk.view_as(p))
        self.opt.step()
        dist.accelerator().synchronize()  # kernels are async on GPUs: time the work, not its launch
        elapsed = time.perf_counter() - t0
        if not measure:
            return
        self.times.append(elapsed)
        if self.compresses:
            stats = self.opt.comm_stats()
            self.sent.append(stats["step_bytes_sent"])
            self.fp32.append(stats["step_bytes_fp32_equiv"])
        else:
            self.sent.append(fp32_allreduce_bytes(self.numel, world))
            self.fp32.append(fp32_allreduce_bytes(self.numel, world))

    def summary(self) -> dict[str, Any]:
        stats = self.opt.comm_stats() if self.compresses else {"stage": "fp32", "local_steps": 0}
        return {"numel": self.numel, "stage": stats["stage"], "bytes_per_step": sum(self.sent) / len(self.sent),
                "fp32_bytes_per_step": sum(self.fp32) / len(self.fp32), "ratio": sum(self.fp32) / max(1, sum(self.sent)),
                "max_bytes_in_a_step": max(self.sent), "ms_per_step": 1000 * statistics.median(self.times),
                "local_steps": stats.get("local_steps", 0), "measured_steps": len(self.times)}


def _run_arms(args, rank: int, world: int) -> dict[str, dict[str, Any]]:
    """Step the arms round-robin, one step each per round, so load drifts hit every arm alike."""
    arms = [_Arm(label, args, rank) for label in ARMS]
    for step in range(args.warmup + args.steps):
        for arm in arms:
            arm.step(world, measure=step >= args.warmup)
    return {arm.label: arm.summary() for arm in arms}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="bench comm on every rank (started by launch())")
    p.add_argument("--result", required=True, help="JSON file rank 0 writes")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--warmup", type=int, required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the DeepSpeed launcher
    return p


def main(args: argparse.Namespace) -> int:
    """Rank entry: every arm on this rank; rank 0 writes ``--result``."""
    from dat_ds.core import dist
    from dat_ds.core.io import atomic_write_json

    dist.setup_logging()
    dist.init_distributed()
    threads = dist.set_threads_per_rank()
    results = _run_arms(args, dist.rank(), dist.world_size())
    if dist.is_main_process():
        atomic_write_json(args.result, {"backend": dist.accelerator().communication_backend_name(),
                                        "device": str(dist.device()), "threads_per_rank": threads, "arms": results})
    dist.barrier()
    return 0


def _plot(arms: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dat_ds.core.io import atomic_write_bytes

    labels = list(arms)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    kib = [arms[k]["bytes_per_step"] / 1024 for k in labels]
    bars = ax1.bar(labels, kib, color=["#7f7f7f"] + ["#4472c4"] * (len(labels) - 1))
    ax1.set_yscale("log")
    for b, k in zip(bars, labels):
        ax1.annotate(f"{arms[k]['ratio']:.1f}x less" if k != "fp32 all-reduce" else "fp32",
                     (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=8)
    ax1.set(ylabel="KiB sent per step by one rank (log)", title="bytes on the wire")
    ms = [arms[k]["ms_per_step"] for k in labels]
    bars = ax2.bar(labels, ms, color=["#7f7f7f"] + ["#ed7d31"] * (len(labels) - 1))
    for b, v in zip(bars, ms):
        ax2.annotate(f"{v:.1f}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=8)
    ax2.set(ylabel="ms per optimizer step (median)", title="wall time per step (comm + update)")
    for ax in (ax1, ax2):
        plt.setp(ax.get_xticklabels(), rotation=15, ha="right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def run(args: argparse.Namespace) -> dict[str, Any]:
    from dat_ds.core.errors import ConfigError

    if args.nproc < 2:
        raise ConfigError(f"bench comm needs --nproc >= 2 (got {args.nproc}); with one rank nothing is sent")
    if args.steps < 1 or args.warmup < 1:
        raise ConfigError("bench comm needs --steps >= 1 and --warmup >= 1")
    with tempfile.TemporaryDirectory(prefix="dat-ds-bench-") as tmp:
        out_file = Path(tmp) / "comm.json"
        t0 = time.perf_counter()
        launch("benchmarks.comm", ["--result", str(out_file), "--steps", str(args.steps), "--warmup",
                                   str(args.warmup), "--model", args.model],
               nproc=args.nproc, env=checkout_env({"DAT_DS_THREADS_PER_RANK": "1"}))
        measured = json.loads(out_file.read_text())
    arms = measured["arms"]
    goals = {k: {"min_ratio": v, "ratio": arms[k]["ratio"], "met": arms[k]["ratio"] >= v} for k, v in GOALS.items()}
    base_ms = arms["fp32 all-reduce"]["ms_per_step"]
    result = {"nproc": args.nproc, "backend": measured["backend"], "model": args.model,
              "numel": arms["fp32 all-reduce"]["numel"], "warmup_steps": args.warmup, "measured_steps": args.steps,
              "threads_per_rank": measured["threads_per_rank"], "seconds": time.perf_counter() - t0, "arms": arms, "goals": goals,
              "goal_met": all(g["met"] for g in goals.values())}
    out = Path(args.out)
    write_result(out, "comm", result)
    title = (f"{args.nproc} ranks, {measured['backend']}, {args.model} ({result['numel']:,} params), "
             f"compression stage")
    _plot(arms, out / "comm.png", title)
    show_table(f"bench comm: {title}", ["arm", "bytes/step", "fp32 bytes/step", "less than fp32", "ms/step",
                                        "vs fp32 time", "goal"],
               [[k, int(a["bytes_per_step"]), int(a["fp32_bytes_per_step"]), f"{a['ratio']:.1f}x",
                 a["ms_per_step"], f"{a['ms_per_step'] / base_ms:.2f}x",
                 (f">= {GOALS[k]}x: {'met' if goals[k]['met'] else 'MISSED'}" if k in GOALS else "-")]
                for k, a in arms.items()])
    return result


if __name__ == "__main__":
    sys.exit(run_entry(lambda: main(get_args_parser().parse_args())))
