"""``dat-ds bench engine`` and ``launch_worker``, which the multi-rank benchmarks share.

engine: samples/s of our DeepSpeed-engine trainer vs a plain ``torch.nn.parallel.DDP`` loop doing the
same adversarial-training work on 2 ranks (same objective, model, batch, data shard; pass counts are
recorded to show the work is equal). Arms alternate over ``--repeats`` launches.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
from pathlib import Path
from typing import Any

from ..launch.launcher import launch
from . import write_result
from .common import save_bar_plot, show_table

log = logging.getLogger(__name__)


def launch_worker(arm: str, nproc: int, *, steps: int, micro: int, model: str, attack_steps: int,
                  threads_per_rank: int | None = None, extra: list[str] | None = None) -> dict[str, Any]:
    """One ``dat_ds.bench.worker`` run on ``nproc`` ranks (through ``launch()``); returns rank 0's result."""
    with tempfile.TemporaryDirectory(prefix="dat-ds-bench-") as tmp:
        result = Path(tmp) / "result.json"
        argv = ["--arm", arm, "--result", str(result), "--steps", str(steps), "--micro", str(micro),
                "--model", model, "--attack-steps", str(attack_steps), *(extra or [])]
        env = {"DAT_DS_THREADS_PER_RANK": str(threads_per_rank)} if threads_per_rank else None
        launch("dat_ds.bench.worker", argv, nproc=nproc, env=env)  # raises RankFailure naming the failed rank
        return json.loads(result.read_text())


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--steps", type=int, default=30, help="timed steps per launch")
    p.add_argument("--micro", type=int, default=64, help="per-rank batch")
    p.add_argument("--model", default="small_cnn")
    p.add_argument("--attack-steps", type=int, default=5)
    p.add_argument("--repeats", type=int, default=2, help="launches per arm, alternating")


def run(args: argparse.Namespace) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {"deepspeed": [], "ddp": []}
    for _ in range(args.repeats):
        for arm in ("deepspeed", "ddp"):
            runs[arm].append(launch_worker(arm, args.nproc, steps=args.steps, micro=args.micro, model=args.model,
                                           attack_steps=args.attack_steps))
    sps = {arm: statistics.median(r["samples_per_s"] for r in rs) for arm, rs in runs.items()}
    ratio = sps["deepspeed"] / sps["ddp"]
    out = {"nproc": args.nproc, "micro_batch": args.micro, "model": args.model, "attack_steps": args.attack_steps,
           "runs": runs, "samples_per_s": sps, "deepspeed_over_ddp": ratio, "goal": "deepspeed_over_ddp >= 0.95",
           "goal_met": ratio >= 0.95,
           "same_work": all(a["forward_passes_rank0"] == b["forward_passes_rank0"] and
                            a["backward_passes_rank0"] == b["backward_passes_rank0"]
                            for a, b in zip(runs["deepspeed"], runs["ddp"]))}
    write_result(args.out, "engine", out)
    save_bar_plot(Path(args.out) / "engine.png", ["DeepSpeed engine", "plain DDP"], [sps["deepspeed"], sps["ddp"]],
                  ylabel="samples/s", title=f"DAT-PGD-{args.attack_steps} on {args.nproc} ranks")
    show_table(f"bench engine: {args.nproc} ranks, DAT-PGD-{args.attack_steps}, {args.model}",
               ["arm", "samples/s", "fwd passes", "bwd passes"],
               [[arm, sps[arm], runs[arm][0]["forward_passes_rank0"], runs[arm][0]["backward_passes_rank0"]]
                for arm in runs] + [["ratio", ratio, None, None]])
    return out
